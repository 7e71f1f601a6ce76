"""A trainer under torchrun against a rollout server speaking SGLang's protocol: sync weights
over a gloo broadcast group, generate, check log-probs, train one GRPO pass, sync again, then
read every tensor back from the server. Every payload the client sends is validated against
the recorded sglang 0.5.23 schemas. Rank 0 writes a JSON report.

Usage: torchrun --nproc_per_node N sglang_sync_worker.py REPORT URL BASE_PORT key=value ...
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglang_schema import validate_request  # noqa: E402

from sfpo_megatron.policy.actor import Actor  # noqa: E402
from sfpo_megatron.algorithms.advantages import group_advantages  # noqa: E402
from sfpo_megatron.policy.batch import PolicyBatch  # noqa: E402
from sfpo_megatron.hf.export import export_stream  # noqa: E402
from sfpo_megatron.config import load_config  # noqa: E402
from sfpo_megatron.launch.parallel import shutdown  # noqa: E402
from sfpo_megatron.common.samples import SamplingParams  # noqa: E402
from sfpo_megatron.rollout.sglang_client import SGLangClient  # noqa: E402
from sfpo_megatron.sync.broadcast import DistributedSync  # noqa: E402
from sfpo_megatron.training.preflight import launch_checked  # noqa: E402


class ValidatingClient(SGLangClient):
    def _request(self, method, path, payload=None):
        validate_request(path, payload)
        self.sent = getattr(self, "sent", 0) + 1
        return super()._request(method, path, payload)


def batch_from(samples):
    rows = [s.prompt_ids + s.output_ids for s in samples]
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    rollout_lp = torch.zeros(len(rows), width)
    for i, (row, s) in enumerate(zip(rows, samples, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(s.prompt_ids) : len(row)] = True
        rollout_lp[i, len(s.prompt_ids) : len(row)] = torch.tensor(s.output_logprobs)
    return tokens, mask, rollout_lp


def main():
    report, url, base_port, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch, checkpoint = launch_checked(cfg)
    actor = Actor.build(cfg, arch, checkpoint)
    client = ValidatingClient(url, timeout_s=120)
    client.wait_healthy(60)
    sync = DistributedSync(
        [client], "127.0.0.1", int(base_port), bucket_mb=0.05, timeout_s=cfg.parallel.timeout_s
    )
    sync.connect()
    sync.push(actor.chunks, arch, version=1)

    samples = [None]
    if dist.get_rank() == 0:
        params = SamplingParams(n=2, temperature=cfg.rollout.temperature, max_new_tokens=6, seed=0)
        samples = [client.generate([[5, 17, 42], [7, 8, 9, 10], [99], [3, 4]], params)]
    dist.broadcast_object_list(samples, src=0)
    tokens, mask, rollout_lp = batch_from(samples[0])
    actor_lp, _ = actor.forward_logprobs(PolicyBatch(tokens, mask))
    rewards = torch.tensor([float(len(s.output_ids) % 2) for s in samples[0]])
    batch = PolicyBatch(tokens, mask, advantages=group_advantages(rewards, 2))
    actor.train_pass(replace(batch, old_logprobs=actor_lp))

    before = sync.buckets_sent
    sync.push(actor.chunks, arch, version=2)
    mismatched, checked = [], 0
    for bucket in export_stream(actor.chunks, arch, 0.05):
        if sync.sender:
            for name, tensor in bucket:
                served = torch.tensor(client.get_weights_by_name(name, tensor.numel()))
                checked += 1
                if not torch.equal(served, tensor.reshape(-1).float()):
                    mismatched.append(name)
    mine = {"buckets": sync.buckets_sent - before, "checked": checked, "mismatched": mismatched}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        info = client._request("GET", "/model_info")
        Path(report).write_text(
            json.dumps(
                {
                    "ranks": everyone,
                    "model_info": info,
                    "sample_versions": sorted({s.weight_version for s in samples[0]}),
                    "logprob_gap": (actor_lp - rollout_lp)[mask].abs().max().item(),
                    "expected_tensors": len(arch_names(arch)),
                }
            )
        )
    shutdown()


def arch_names(arch):
    from sfpo_megatron.hf.mapping import hf_shapes

    return hf_shapes(arch)


if __name__ == "__main__":
    main()
