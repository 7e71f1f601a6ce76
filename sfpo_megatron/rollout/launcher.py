"""Start rollout servers from the trainer's nodes (colocated) and wait until they answer;
attaching to servers started elsewhere needs only their URLs (an SGLangClient each).

A server that dies while starting, or does not answer within the timeout, is an error that
carries the tail of its log, never a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.rollout.sglang_client import SGLangClient

HEALTH_PROBE_TIMEOUT_S = 10.0
"""Timeout of one ``/health`` probe of a starting server (not retried: the next probe is)."""
STARTUP_POLL_S = 0.5
"""Pause between two probes of a starting server."""
STOP_GRACE_S = 30
"""Seconds a terminated server gets to exit before it is killed."""


def sglang_command(
    model_path: str,
    port: int,
    tp: int = 1,
    host: str = "127.0.0.1",
    memory_saver: bool = False,
    extra: tuple[str, ...] = (),
    weight_format: str = "bf16",
) -> list[str]:
    """``python -m sglang.launch_server`` for one rollout GPU group. The trainer sends token
    ids, so the server skips its tokenizer; ``memory_saver`` allows releasing its memory
    while the colocated trainer trains. ``weight_format="fp8"``: fp8 block weights (the
    model directory of :func:`~sfpo_megatron.hf.export.write_served_fp8_model`), no checkpoint
    read at start."""
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp),
        "--skip-tokenizer-init",
    ]
    if memory_saver:
        command.append("--enable-memory-saver")
    if weight_format == "fp8":
        command += ["--quantization", "fp8", "--load-format", "dummy"]
    return command + list(extra)


def embedded_command(
    hf_dir: str, port: int, host: str = "127.0.0.1", device: str = "cpu", load_weights: bool = False
) -> list[str]:
    """The embedded engine's server (same HTTP protocol, no SGLang needed)."""
    command = [
        sys.executable,
        "-m",
        "sfpo_megatron.rollout.http_server",
        "--hf-dir",
        hf_dir,
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        device,
    ]
    return command + (["--load-weights"] if load_weights else [])


class ServerProcess:
    """One rollout server process: started, health-checked, restarted, stopped."""

    def __init__(
        self,
        command: list[str],
        url: str,
        log_path: str | Path,
        health_timeout_s: float,
        gpus: list[int] | None = None,
        *,
        request_timeout_s: float,
    ) -> None:
        self.command, self.url, self.log_path = command, url, Path(log_path)
        self.health_timeout_s, self.request_timeout_s = health_timeout_s, request_timeout_s
        self.env = dict(os.environ)
        if gpus is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        self.process: subprocess.Popen | None = None

    def start(self) -> SGLangClient:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        client = SGLangClient(self.url, HEALTH_PROBE_TIMEOUT_S, retries=0)
        deadline = time.monotonic() + self.health_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RolloutError(
                    f"rollout server exited with {self.process.returncode} while "
                    f"starting: {' '.join(self.command)}\n{self.log_tail()}"
                )
            try:
                client._request("GET", "/health")
                return SGLangClient(self.url, self.request_timeout_s)
            except RolloutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RolloutError(
                        f"rollout server at {self.url} not healthy within "
                        f"{self.health_timeout_s}s\n{self.log_tail()}"
                    ) from None
                time.sleep(STARTUP_POLL_S)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> SGLangClient:
        self.stop()
        return self.start()

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
