"""One rollout server per srun task of the disaggregated job (train_disaggregated.sbatch).

Task i of a node (SLURM_LOCALID) serves on port BASE + i with the i-th group of TP GPUs of
those Slurm gave the step, so ``srun --ntasks-per-node=GPUS/TP`` fills a node with servers.
The command line comes from sfpo_megatron.rollout.launcher (the one place that knows the
servers' flags); this process then becomes the server, so srun's signals reach it.

    python examples/slurm/rollout_server.py --engine sglang --model DIR --tp 2 --port 30000 \
        [-- EXTRA SGLANG ARGS]

``--engine embedded`` serves the trainer's own engine over the same protocol (CPU, CI).
"""

from __future__ import annotations

import argparse
import os
import sys

from sfpo_megatron.rollout.launcher import embedded_command, sglang_command


def task_gpus(visible: str, local_id: int, tp: int) -> str:
    """The ``local_id``-th group of ``tp`` devices of a CUDA_VISIBLE_DEVICES list."""
    devices = visible.split(",")
    if (local_id + 1) * tp > len(devices):
        raise SystemExit(
            f"rollout server {local_id} needs GPUs {local_id * tp}..{(local_id + 1) * tp - 1} "
            f"but the step sees {len(devices)} ({visible}): lower --ntasks-per-node or --tp"
        )
    return ",".join(devices[local_id * tp : (local_id + 1) * tp])


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sglang", "embedded"], default="sglang")
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="GPUs per server")
    parser.add_argument("--port", type=int, default=30000, help="port of the node's first server")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--device", default="cpu", help="embedded engine only")
    args = parser.parse_args(own)
    local_id = int(os.environ.get("SLURM_LOCALID", "0"))
    port = args.port + local_id
    env = dict(os.environ)
    if "CUDA_VISIBLE_DEVICES" in env:
        env["CUDA_VISIBLE_DEVICES"] = task_gpus(env["CUDA_VISIBLE_DEVICES"], local_id, args.tp)
    if args.engine == "sglang":
        command = sglang_command(args.model, port, tp=args.tp, host=args.host, extra=tuple(extra))
    else:
        if args.tp != 1 or extra:
            raise SystemExit("the embedded engine takes no --tp > 1 and no extra arguments")
        command = embedded_command(args.model, port, host=args.host, device=args.device)
    print(f"rollout server {local_id} on port {port}: {' '.join(command)}", flush=True)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
