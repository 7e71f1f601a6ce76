"""Several rollout servers behind the one engine interface the trainer samples from."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from sfpo_megatron.common.samples import Sample, SamplingParams
from sfpo_megatron.rollout.sglang_client import SGLangClient


class ServerPool:
    """Splits each batch of prompts into contiguous, nearly equal shares, one per server,
    generated concurrently; samples come back prompt-major as from one engine."""

    def __init__(self, clients: list[SGLangClient]) -> None:
        if not clients:
            raise ValueError("a server pool needs at least one server")
        self.clients = clients
        self.pool = ThreadPoolExecutor(len(clients))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        count = len(self.clients)
        bounds = [len(prompts) * i // count for i in range(count + 1)]
        futures = [
            self.pool.submit(client.generate, prompts[bounds[i] : bounds[i + 1]], params)
            for i, client in enumerate(self.clients)
        ]
        return [
            replace(sample, prompt_index=sample.prompt_index + bounds[i])
            for i, future in enumerate(futures)
            for sample in future.result()
        ]

    def wait_healthy(self, timeout_s: float) -> None:
        for client in self.clients:
            client.wait_healthy(timeout_s)
