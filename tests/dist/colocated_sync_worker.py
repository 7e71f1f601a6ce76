"""A trainer under torchrun against rollout servers speaking SGLang's protocol, synced the
colocated way (/update_weights_from_tensor, tensors shared through memory): release the
engines' memory, sync, generate and check log-probs, train one GRPO pass, sync again, then
read every tensor back from every server. Every payload the client sends is validated
against the recorded sglang 0.5.23 schemas. Rank 0 writes a JSON report.

Usage: torchrun --nproc_per_node N colocated_sync_worker.py REPORT ENGINE_TP URL[,URL...]
           key=value ...
"""

import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglang_sync_worker import ValidatingClient, arch_names, batch_from  # noqa: E402

from sfpo_megatron.policy.actor import Actor  # noqa: E402
from sfpo_megatron.algorithms.advantages import group_advantages  # noqa: E402
from sfpo_megatron.policy.batch import PolicyBatch  # noqa: E402
from sfpo_megatron.hf.export import export_stream, stage_leader  # noqa: E402
from sfpo_megatron.config import load_config  # noqa: E402
from sfpo_megatron.launch.parallel import shutdown  # noqa: E402
from sfpo_megatron.common.samples import SamplingParams  # noqa: E402
from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.sync.colocated import ColocatedSync  # noqa: E402
from sfpo_megatron.protocol.flat_bucket import flatten  # noqa: E402
from sfpo_megatron.training.preflight import launch_checked  # noqa: E402

BUCKET_MB = 0.05
SESSION_PATHS = {
    "/release_memory_occupation",
    "/resume_memory_occupation",
    "/begin_weight_update",
    "/end_weight_update",
}


class RecordingClient(ValidatingClient):
    """Also records the session and memory calls, in order, with their tags, and the
    ``weight_version`` of each bucket posted."""

    def _request(self, method, path, payload=None):
        if path in SESSION_PATHS:
            self.calls = [*getattr(self, "calls", []), [path, (payload or {}).get("tags")]]
        if path == "/update_weights_from_tensor":
            self.versions = [*getattr(self, "versions", []), payload.get("weight_version")]
        return super()._request(method, path, payload)


def check_served(actor, arch, clients, before=None):
    """Every server holds this stage's exported tensors exactly (checked on the stage leader,
    collective over all ranks); also how many differ from ``before`` and the stage's
    bucket count and tensors."""
    checked, mismatched, changed, buckets, tensors = 0, [], 0, 0, {}
    for bucket in export_stream(actor.chunks, arch, BUCKET_MB):
        buckets += 1
        if not stage_leader():
            continue
        for name, tensor in bucket:
            tensors[name] = tensor
            changed += before is not None and not torch.equal(before[name], tensor)
            for index, client in enumerate(clients):
                served = torch.tensor(client.get_weights_by_name(name, tensor.numel()))
                checked += 1
                if not torch.equal(served, tensor.reshape(-1).float()):
                    mismatched.append(f"server {index}: {name}")
    return {
        "checked": checked,
        "mismatched": mismatched,
        "changed": changed,
        "buckets": buckets,
    }, tensors


def main():
    report, engine_tp, urls, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch, checkpoint = launch_checked(cfg)
    actor = Actor.build(cfg, arch, checkpoint)
    clients = [RecordingClient(url, timeout_s=120) for url in urls.split(",")]
    for client in clients:
        client.wait_healthy(60)
    try:
        ColocatedSync(clients * 3, int(engine_tp))
        layout_error = None
    except ValueError as error:
        layout_error = str(error)
    sync = ColocatedSync(clients, int(engine_tp), bucket_mb=BUCKET_MB)

    sync.release()
    sync.push(actor.chunks, arch, version=1)
    first, before = check_served(actor, arch, clients)

    samples = [None]
    if dist.get_rank() == 0:
        params = SamplingParams(n=2, temperature=cfg.rollout.temperature, max_new_tokens=6, seed=0)
        samples = [clients[0].generate([[5, 17, 42], [7, 8, 9, 10], [99], [3, 4]], params)]
    dist.broadcast_object_list(samples, src=0)
    tokens, mask, rollout_lp = batch_from(samples[0])
    actor_lp, _ = actor.forward_logprobs(PolicyBatch(tokens, mask))
    rewards = torch.tensor([float(len(s.output_ids) % 2) for s in samples[0]])
    batch = PolicyBatch(tokens, mask, advantages=group_advantages(rewards, 2))
    actor.train_pass(replace(batch, old_logprobs=actor_lp))

    sent_before = sync.buckets_sent
    clients[sync.engine].versions = []
    sync.push(actor.chunks, arch, version=2)
    second, _ = check_served(actor, arch, clients, before)
    mine = {
        "first": first,
        "second": second,
        "sent": sync.buckets_sent - sent_before,
        "versions": clients[sync.engine].versions,
        "leader": sync.leader,
        "engine": sync.engine,
    }

    stray = flatten([("x", torch.arange(4.0))])  # no session open: every rank must hear it
    try:
        sync._post(stray, last=True, version=3)
        mine["refused"] = None
    except RolloutError as error:
        mine["refused"] = str(error)

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(report).write_text(
            json.dumps(
                {
                    "ranks": everyone,
                    "model_info": [c._request("GET", "/model_info") for c in clients],
                    "calls": [getattr(c, "calls", []) for c in clients],
                    "sample_versions": sorted({s.weight_version for s in samples[0]}),
                    "logprob_gap": (actor_lp - rollout_lp)[mask].abs().max().item(),
                    "expected_tensors": len(arch_names(arch)),
                    "layout_error": layout_error,
                }
            )
        )
    shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # the test then stops the servers (test_colocated_sync.py)
        Path(f"{sys.argv[1]}.failed{os.environ['RANK']}").write_text(traceback.format_exc())
        raise
