"""HTTP client of an SGLang 0.5.23 server (or the embedded engine's server): generation with
many concurrent requests, and the weight-update control calls (docs/sglang_protocol.md).

A batch either completes or raises :class:`RolloutError`: connection errors and 5xx replies
are retried with back-off, each request has a timeout, and an aborted or short reply is an
error, never a partial batch.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.common.samples import Sample, SamplingParams

SAMPLING_FIELDS = {
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_new_tokens": "max_new_tokens",
    "stop_token_ids": "stop_token_ids",
    "sampling_seed": "seed",
}
"""SGLang ``sampling_params`` key -> :class:`SamplingParams` field, for the keys we use."""

WEIGHTS_TAG = "weights"
MEMORY_TAGS = ("kv_cache", WEIGHTS_TAG, "cuda_graph")
"""What ``/release_`` and ``/resume_memory_occupation`` act on (sglang ``srt/constants.py``)."""

REQUEST_RETRIES = 3
"""Retries of a request that failed to connect or got a 5xx reply (not a config key)."""
RETRY_BACKOFF_S = 0.5
"""The wait before the first retry; it doubles with each further one."""
MAX_CONCURRENT_REQUESTS = 64
"""Generation requests in flight at once per server (one per prompt)."""
HEALTH_POLL_S = 0.2
"""Pause between two ``/health`` probes of :meth:`SGLangClient.wait_healthy`."""

NOT_RETRIED = {"/update_weights_from_tensor"}
"""Paths sent once only: a repeat would unpickle the entries twice, and each unpickling
drops one reference the sender's shared-memory / CUDA-IPC handle counts on."""


class SGLangClient:
    """One server's client; ``timeout_s`` bounds each request (``rollout.request_timeout_s``
    for a run's servers)."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        retries: int = REQUEST_RETRIES,
        backoff_s: float = RETRY_BACKOFF_S,
        max_concurrency: int = MAX_CONCURRENT_REQUESTS,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.pool = ThreadPoolExecutor(max_concurrency)

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        retries = 0 if path in NOT_RETRIED else self.retries
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    body = reply.read()
                return json.loads(body) if body else None
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code < 500 or attempt == retries:
                    raise RolloutError(f"{method} {path}: HTTP {error.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                if attempt == retries:
                    raise RolloutError(
                        f"{method} {path} at {self.url} failed after {attempt + 1} tries: {error}"
                    ) from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _control(self, path: str, payload: dict) -> dict:
        reply = self._request("POST", path, payload)
        if isinstance(reply, dict) and reply.get("success") is False:
            raise RolloutError(f"POST {path}: {reply.get('message')}")
        return reply

    # ------------------------------------------------------------------ generation

    @staticmethod
    def sampling_params(params: SamplingParams) -> dict:
        payload = {key: getattr(params, field) for key, field in SAMPLING_FIELDS.items()}
        payload["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is None:
            del payload["sampling_seed"]
        return payload

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """``params.n`` samples per prompt, prompt-major; one request per prompt, concurrently."""
        sampling = self.sampling_params(params)

        def one(index: int) -> list[Sample]:
            payload = {
                "input_ids": prompts[index],
                "sampling_params": sampling,
                "return_logprob": True,
            }
            reply = self._request("POST", "/generate", payload)
            replies = reply if isinstance(reply, list) else [reply]
            if len(replies) != params.n:
                raise RolloutError(f"prompt {index}: {len(replies)} samples, asked {params.n}")
            return [_sample(index, prompts[index], r) for r in replies]

        return [s for group in self.pool.map(one, range(len(prompts))) for s in group]

    # ------------------------------------------------------------------ control

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._request("GET", "/health")
                return
            except RolloutError as error:
                if time.monotonic() > deadline:
                    raise RolloutError(
                        f"{self.url} not healthy after {timeout_s}s: {error}"
                    ) from None
                time.sleep(HEALTH_POLL_S)

    def weight_version(self) -> str:
        return self._request("GET", "/model_info")["weight_version"]

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> dict:
        return self._control(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        weight_version: str | None,
    ) -> dict:
        payload = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "load_format": "flattened_bucket",
            "flush_cache": False,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return self._control("/update_weights_from_distributed", payload)

    def update_weights_from_tensor(
        self, serialized_named_tensors: list[str], weight_version: str | None
    ) -> dict:
        """One flattened bucket, one base64 entry per engine TP rank (``sync/colocated.py``)."""
        payload = {
            "serialized_named_tensors": serialized_named_tensors,
            "load_format": "flattened_bucket",
            "flush_cache": False,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return self._control("/update_weights_from_tensor", payload)

    def begin_weight_update(self) -> dict:
        return self._control("/begin_weight_update", {})

    def end_weight_update(self) -> dict:
        return self._control("/end_weight_update", {})

    def pause_generation(self) -> dict:
        return self._control("/pause_generation", {"mode": "abort"})

    def continue_generation(self) -> dict:
        return self._control("/continue_generation", {})

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Colocated runs: free the engine's memory before training (SGLang needs
        --enable-memory-saver). ``None`` = every tag (weights, KV cache, CUDA graphs)."""
        self._request("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """After training: resume ``["weights"]``, sync weights, then the other tags (each
        released tag once: SGLang fails on resuming one that is not released)."""
        self._request("POST", "/resume_memory_occupation", {"tags": tags})

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache", {})

    def get_weights_by_name(self, name: str, truncate_size: int) -> list:
        return self._request(
            "POST", "/get_weights_by_name", {"name": name, "truncate_size": truncate_size}
        )


def _sample(index: int, prompt: list[int], reply: dict) -> Sample:
    meta = reply["meta_info"]
    kind = meta["finish_reason"]["type"]
    if kind not in ("stop", "length"):
        raise RolloutError(f"prompt {index}: generation ended with {meta['finish_reason']}")
    logprobs = meta["output_token_logprobs"]
    if [t for _, t, _ in logprobs] != reply["output_ids"]:
        raise RolloutError(f"prompt {index}: log-probs do not cover the output tokens")
    version = str(meta.get("weight_version"))
    if not version.isdigit():  # SGLang starts at "default": no weights pushed by a trainer yet
        raise RolloutError(
            f"prompt {index}: served by weight version {version!r}, not one a trainer pushed"
        )
    return Sample(
        prompt_index=index,
        prompt_ids=list(prompt),
        output_ids=reply["output_ids"],
        output_logprobs=[lp for lp, _, _ in logprobs],
        finish_reason=kind,
        weight_version=int(version),
    )
