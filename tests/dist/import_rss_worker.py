"""Peak host memory of importing a HF checkpoint (torchrun, every rank reports).

The kernel's high-water mark of resident memory (VmHWM) is reset just before the import
(/proc/self/clear_refs), so the peak it reports afterwards belongs to the import alone;
memory-mapped file pages a rank touches count in it too.

Usage: torchrun --nproc_per_node N import_rss_worker.py REPORT.json key=value ...
"""

import json
import re
import sys
from pathlib import Path

import torch.distributed as dist

from sfpo_megatron.hf.load import load_hf_weights
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import shutdown
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.training.preflight import launch_checked


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def main():
    report, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch, checkpoint = launch_checked(cfg)
    chunks = build_model(cfg, arch)
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    load_hf_weights(chunks, arch, checkpoint)
    mine = {"rank": dist.get_rank(), "rss_before_kib": before, "peak_kib": status_kib("VmHWM"),
            "local_param_bytes": sum(p.numel() * p.element_size()
                                     for c in chunks for p in c.parameters())}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(report).write_text(json.dumps(everyone))
    shutdown()


if __name__ == "__main__":
    main()
