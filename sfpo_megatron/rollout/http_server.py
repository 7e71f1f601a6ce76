"""The embedded engine served over the subset of SGLang 0.5.23's HTTP protocol the trainer uses
(docs/sglang_protocol.md), with the same semantics, so the SGLang client and the distributed
and colocated weight syncs run end to end against a real server process without SGLang.

    python -m sfpo_megatron.rollout.http_server --hf-dir DIR --port 30000 [--load-weights]
        [--tp-size N]
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sfpo_megatron.common.log import configure as configure_logging
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.config import RolloutConfig
from sfpo_megatron.protocol.flat_bucket import total_bytes, unflatten
from sfpo_megatron.protocol.group import weight_update_group
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.sglang_client import MEMORY_TAGS, SAMPLING_FIELDS, WEIGHTS_TAG

GROUP_TIMEOUT_S = 600.0
"""How long the server's side of a weight-update group waits for its members: SGLang's
``/init_weights_update_group`` request carries no timeout (the trainer's side uses
``parallel.timeout_s``)."""

log = logging.getLogger("sfpo_megatron.rollout.http_server")  # also when run as __main__


class RequestError(ValueError):
    """A request the server refuses (HTTP 400)."""


class EngineServer:
    """Request handling, independent of HTTP. One request runs at a time (as SGLang's control
    requests do); generation is refused with 503 while paused, so clients retry."""

    def __init__(self, engine: EmbeddedEngine, model_path: str, tp_size: int = 1) -> None:
        self.engine, self.model_path = engine, model_path
        self.tp_size = tp_size
        """Entries per ``/update_weights_from_tensor`` request: one per SGLang TP rank. The
        engine is one process; it reads every entry, as each rank would, and loads the first."""
        self.offloaded: set[str] = set()
        self.lock = threading.Lock()
        self.paused = False
        self.groups: dict[str, Any] = {}
        self.session: list[tuple[str, torch.Tensor]] | None = None
        self.session_version: str | None = None
        self.update_requests = 0

    def generate(self, body: dict) -> Any:
        if self.paused:
            raise ServiceUnavailable("generation is paused")
        prompts = body.get("input_ids")
        single = bool(prompts) and isinstance(prompts[0], int)
        prompts = [prompts] if single else prompts
        params = _sampling_params(body.get("sampling_params") or {})
        samples = self.engine.generate(prompts, params)
        results = [
            {
                "text": "",
                "output_ids": s.output_ids,
                "meta_info": {
                    "id": uuid.uuid4().hex,
                    "finish_reason": (
                        {"type": "stop", "matched": s.output_ids[-1]}
                        if s.finish_reason == "stop"
                        else {"type": "length", "length": len(s.output_ids)}
                    ),
                    "prompt_tokens": len(s.prompt_ids),
                    "completion_tokens": len(s.output_ids),
                    "weight_version": str(s.weight_version),
                    "output_token_logprobs": [
                        [lp, t, None] for lp, t in zip(s.output_logprobs, s.output_ids, strict=True)
                    ],
                },
            }
            for s in samples
        ]
        return results[0] if single and params.n == 1 else results

    def init_weights_update_group(self, body: dict) -> dict:
        self.groups[body["group_name"]] = weight_update_group(
            body["master_address"],
            body["master_port"],
            body["world_size"],
            body["rank_offset"],
            body["group_name"],
            body.get("backend", "gloo"),
            GROUP_TIMEOUT_S,
        )
        return {"success": True, "message": "weight update group ready"}

    def begin_weight_update(self, body: dict) -> dict:
        if self.session is not None:
            return {"success": False, "message": "a weight update session is already open"}
        self.session, self.session_version, self.update_requests = [], None, 0
        return {"success": True, "message": "begun"}

    def update_weights_from_distributed(self, body: dict) -> dict:
        if self.session is None:
            return {
                "success": False,
                "message": "must run between begin_weight_update() and end_weight_update()",
            }
        if body.get("load_format") != "flattened_bucket":
            raise RequestError("this server takes load_format 'flattened_bucket' only")
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise RequestError(f"no weight update group {body.get('group_name')!r}")
        buffer = torch.empty(total_bytes(body["dtypes"], body["shapes"]), dtype=torch.uint8)
        dist.broadcast(buffer, src=0, group=group)
        self.session += unflatten(buffer, body["names"], body["dtypes"], body["shapes"])
        self.update_requests += 1
        if body.get("weight_version") is not None:
            self.session_version = body["weight_version"]
        return {"success": True, "message": f"received {len(body['names'])} tensors"}

    def update_weights_from_tensor(self, body: dict) -> dict:
        if self.session is None:
            return {
                "success": False,
                "message": "update_weights_from_tensor must run between begin_weight_update() "
                "and end_weight_update()",
            }
        if body.get("load_format") != "flattened_bucket":
            raise RequestError("this server takes load_format 'flattened_bucket' only")
        entries = body["serialized_named_tensors"]
        if len(entries) != self.tp_size:
            raise RequestError(f"{len(entries)} serialized entries for {self.tp_size} TP ranks")
        from sfpo_megatron.protocol.ipc import decode_bucket  # keeps Megatron out of start-up

        ranks = [decode_bucket(entry) for entry in entries]  # each exactly once, as SGLang
        for rank, tensors in enumerate(ranks[1:], start=1):
            if [n for n, _ in tensors] != [n for n, _ in ranks[0]] or not all(
                torch.equal(a.to(b.device), b)
                for (_, a), (_, b) in zip(tensors, ranks[0], strict=True)
            ):
                raise RequestError(f"TP rank {rank}'s entry holds other tensors than rank 0's")
        self.session += [(name, tensor.clone()) for name, tensor in ranks[0]]  # own the memory
        self.update_requests += 1
        if body.get("weight_version") is not None:
            self.session_version = body["weight_version"]
        return {"success": True, "message": f"received {len(ranks[0])} tensors"}

    def end_weight_update(self, body: dict) -> dict:
        if self.session is None:
            return {"success": False, "message": "no weight update session is open"}
        session, version, self.session = self.session, self.session_version, None
        if version is None:
            version = str(self.engine.weight_version() + 1)
        self.engine.update_weights([session], int(version))
        return {"success": True, "message": f"weights at version {version}"}

    def pause_generation(self, body: dict) -> dict:
        self.paused = True
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict) -> dict:
        self.paused = False
        return {"message": "Generation continued successfully.", "status": "ok"}

    def release_memory_occupation(self, body: dict) -> None:
        tags = _memory_tags(body)
        self.offloaded |= set(tags)
        if {"kv_cache", "cuda_graph"} & set(tags):
            self.engine.decoder.drop_cache()  # the graphs are captured over the cache
        if WEIGHTS_TAG in tags:
            self.engine.release_memory()

    def resume_memory_occupation(self, body: dict) -> None:
        tags = _memory_tags(body)
        held = sorted(set(tags) - self.offloaded)
        if held:
            raise RequestError(f"cannot resume {held}: not released (SGLang fails alike)")
        self.offloaded -= set(tags)
        if WEIGHTS_TAG in tags:
            self.engine.resume_memory()

    def flush_cache(self, body: dict) -> str:
        self.engine.decoder.drop_cache()  # its contents never outlive a generate call
        return "Cache flushed."

    def model_info(self, body: dict) -> dict:
        return {
            "model_path": self.model_path,
            "is_generation": True,
            "weight_version": str(self.engine.weight_version()),
            "sfpo_update_requests": self.update_requests,
        }

    def get_weights_by_name(self, body: dict) -> list:
        weight = self.engine.weights.views[body["name"]]
        return weight.detach().reshape(-1)[: body.get("truncate_size", 100)].tolist()

    def health(self, body: dict) -> str:
        return "ok"

    def health_generate(self, body: dict) -> str:
        if not self.engine.health():
            raise ServiceUnavailable("no weights loaded")
        return "ok"


class ServiceUnavailable(RuntimeError):
    """HTTP 503: try again later."""


def _memory_tags(body: dict) -> list[str]:
    """The request's tags; none or empty means all, as in SGLang."""
    tags = body.get("tags") or list(MEMORY_TAGS)
    unknown = sorted(set(tags) - set(MEMORY_TAGS))
    if unknown:
        raise RequestError(f"unknown memory tags {unknown}, expected some of {MEMORY_TAGS}")
    return tags


def _sampling_params(raw: dict) -> SamplingParams:
    unknown = sorted(set(raw) - set(SAMPLING_FIELDS))
    if unknown:
        raise RequestError(
            f"unknown field `{unknown[0]}`, expected one of "
            f"{', '.join(SAMPLING_FIELDS)} (the embedded engine's subset)"
        )
    values = {SAMPLING_FIELDS[k]: v for k, v in raw.items() if v is not None}
    if values.get("stop_token_ids") is not None:
        values["stop_token_ids"] = tuple(values["stop_token_ids"])
    try:
        return SamplingParams(**values)
    except (TypeError, ValueError) as error:
        raise RequestError(str(error)) from None


ROUTES = {
    ("POST", "/generate"): "generate",
    ("GET", "/health"): "health",
    ("GET", "/health_generate"): "health_generate",
    ("GET", "/model_info"): "model_info",
    ("POST", "/init_weights_update_group"): "init_weights_update_group",
    ("POST", "/begin_weight_update"): "begin_weight_update",
    ("POST", "/update_weights_from_distributed"): "update_weights_from_distributed",
    ("POST", "/update_weights_from_tensor"): "update_weights_from_tensor",
    ("POST", "/end_weight_update"): "end_weight_update",
    ("POST", "/pause_generation"): "pause_generation",
    ("POST", "/continue_generation"): "continue_generation",
    ("POST", "/flush_cache"): "flush_cache",
    ("POST", "/release_memory_occupation"): "release_memory_occupation",
    ("POST", "/resume_memory_occupation"): "resume_memory_occupation",
    ("POST", "/get_weights_by_name"): "get_weights_by_name",
}
UNLOCKED = {"health", "model_info", "pause_generation", "continue_generation"}


def make_handler(server: EngineServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            name = ROUTES.get((method, self.path.split("?")[0]))
            if name is None:
                return self._reply(404, {"error": {"message": f"no route {method} {self.path}"}})
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if name in UNLOCKED:
                    result = getattr(server, name)(body)
                else:
                    with server.lock:
                        result = getattr(server, name)(body)
            except ServiceUnavailable as error:
                return self._reply(503, {"error": {"message": str(error)}})
            except (RequestError, KeyError, TypeError, ValueError) as error:
                return self._reply(400, {"error": {"message": f"{type(error).__name__}: {error}"}})
            status = 400 if isinstance(result, dict) and result.get("success") is False else 200
            self._reply(status, result)

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Quiet: one line per request would drown the trainer's output."""

    return Handler


def load_checkpoint_weights(engine: EmbeddedEngine, hf_dir: str | Path) -> None:
    """Give the engine the directory's own safetensors (a server started without a trainer)."""
    from safetensors.torch import load_file

    tensors = [
        (name, tensor)
        for path in sorted(Path(hf_dir).glob("*.safetensors"))
        for name, tensor in load_file(str(path)).items()
        if name in engine.weights.views
    ]
    engine.update_weights([tensors], 0)


def main(argv: list[str] | None = None) -> None:
    configure_logging(every_rank=True)  # a server of its own, not a trainer rank
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--tp-size", type=int, default=1, help="update_weights_from_tensor entries per request"
    )
    parser.add_argument(
        "--load-weights",
        action="store_true",
        help="start from the directory's safetensors (else wait for a sync)",
    )
    parser.add_argument("--kv-cache-gb", type=float, default=RolloutConfig.kv_cache_gb)
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=RolloutConfig.cuda_graphs
    )
    args = parser.parse_args(argv)
    engine = EmbeddedEngine(
        args.hf_dir,
        args.device,
        getattr(torch, args.dtype),
        kv_cache_gb=args.kv_cache_gb,
        cuda_graphs=args.cuda_graphs,
    )
    if args.load_weights:
        load_checkpoint_weights(engine, args.hf_dir)
    httpd = ThreadingHTTPServer(
        (args.host, args.port), make_handler(EngineServer(engine, args.hf_dir, args.tp_size))
    )
    log.info("embedded engine serving %s on http://%s:%d", args.hf_dir, args.host, args.port)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
