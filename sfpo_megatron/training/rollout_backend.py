"""The three ways a run gets rollouts, each with its weight sync and memory hand-off, behind
one small interface: ``generation`` (the collective sampler), ``sync``, ``release`` (before
training), ``restart_dead_servers`` (after a rollout failure) and ``close``; and
:class:`RolloutLink`, the backend as a run uses it, which retries after a restart.

- embedded: an embedded engine in the process of every ``server_tp``-th rank, on its device,
  each generating its share of the prompts, synced in process, its memory released while the
  trainer trains;
- servers: SGLang servers started elsewhere (disaggregated), synced by broadcast groups;
- colocated: one server per ``server_tp`` trainer ranks, launched here on those ranks'
  devices, synced through IPC handles, its memory released while the trainer trains.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sfpo_megatron.common.log import EVERY_RANK
from sfpo_megatron.config import Config
from sfpo_megatron.hf.export import write_served_fp8_model
from sfpo_megatron.launch.parallel import free_port
from sfpo_megatron.models.arch import ModelArch, hf_directory
from sfpo_megatron.models.gpt import DTYPES
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.engine_group import EngineGroup, LeadEngine
from sfpo_megatron.rollout.launcher import ServerProcess, embedded_command, sglang_command
from sfpo_megatron.rollout.scoring import retried
from sfpo_megatron.rollout.server_pool import ServerPool
from sfpo_megatron.rollout.sglang_client import MEMORY_TAGS, SGLangClient
from sfpo_megatron.sync.broadcast import DistributedSync
from sfpo_megatron.sync.colocated import ColocatedSync
from sfpo_megatron.sync.in_process import sync_in_process

if TYPE_CHECKING:
    from sfpo_megatron.policy.actor import Actor

log = logging.getLogger(__name__)


class EmbeddedBackend:
    """Engine ``e`` on global rank ``e * server_tp``."""

    def __init__(self, cfg: Config, arch: ModelArch, device: torch.device) -> None:
        self.arch, self.engine = arch, None
        self.weight_format = cfg.rollout.weight_format
        step = cfg.rollout.server_tp
        if dist.get_rank() % step == 0:
            self.engine = EmbeddedEngine(
                hf_directory(cfg.model.hf_config),
                device,
                DTYPES[cfg.model.dtype],
                kv_cache_gb=cfg.rollout.kv_cache_gb,
                cuda_graphs=cfg.rollout.cuda_graphs,
            )
        self.generation = EngineGroup(self.engine, list(range(0, dist.get_world_size(), step)))

    def sync(self, chunks: list, version: int) -> None:
        sync_in_process(chunks, self.arch, self.engine, version, weight_format=self.weight_format)
        if self.engine is not None:
            self.engine.resume_memory()

    def release(self) -> None:
        """On CUDA the engines' weights wait in host memory while the actor trains."""
        if self.engine is not None:
            self.engine.release_memory()

    def restart_dead_servers(self) -> bool:
        return False

    def close(self) -> None:
        """Nothing outlives the process."""


class ServersBackend:
    """Disaggregated: a failed server is reported (it is not ours to restart)."""

    def __init__(self, cfg: Config, arch: ModelArch) -> None:
        r = cfg.rollout
        self.arch, self.engine = arch, None
        clients = [SGLangClient(url, r.request_timeout_s) for url in r.server_urls]
        if dist.get_rank() == 0:
            self.engine = ServerPool(clients)
            self.engine.wait_healthy(cfg.parallel.timeout_s)
        self.generation = LeadEngine(self.engine)
        self.push = DistributedSync(
            clients,
            r.sync_address or socket.gethostname(),
            r.sync_port,
            "nccl" if torch.cuda.is_available() else "gloo",
            r.server_tp,
            timeout_s=cfg.parallel.timeout_s,
            weight_format=r.weight_format,
        )
        self.push.connect()

    def sync(self, chunks: list, version: int) -> None:
        self.push.push(chunks, self.arch, version)

    def release(self) -> None:
        """The servers have devices of their own."""

    def restart_dead_servers(self) -> bool:
        return False

    def close(self) -> None:
        """The servers belong to whoever started them."""


class ColocatedBackend:
    """Engine ``e`` is launched by global rank ``e * server_tp`` on the devices of ranks
    ``e * server_tp ...``; its log goes to ``logging.output_dir/rollout_server<e>.log``."""

    def __init__(self, cfg: Config, arch: ModelArch) -> None:
        r = cfg.rollout
        self.arch, self.engine, self.restart = arch, None, r.restart_servers
        rank = dist.get_rank()
        self.server: ServerProcess | None = None
        url = None
        if rank % r.server_tp == 0:
            self.server = _launch(cfg, rank // r.server_tp)
            url = self.server.url
        urls: list = [None] * dist.get_world_size()
        dist.all_gather_object(urls, url)
        clients = [SGLangClient(u, r.request_timeout_s) for u in urls if u is not None]
        if rank == 0:
            self.engine = ServerPool(clients)
        self.generation = LeadEngine(self.engine)
        self.push = ColocatedSync(clients, r.server_tp, weight_format=r.weight_format)

    def sync(self, chunks: list, version: int) -> None:
        self.push.push(chunks, self.arch, version)

    def release(self) -> None:
        self.push.release()

    def restart_dead_servers(self) -> bool:
        """Collective: restart every server that died (when configured); True if any was."""
        dead = self.server is not None and not self.server.alive()
        if dead and self.restart:
            log.warning(
                "rank %d: its rollout server %s died; restarting it",
                dist.get_rank(),
                self.server.url,
                extra=EVERY_RANK,
            )
            client = self.server.restart()
            if self.push.released:  # like the other engines until the next sync
                client.release_memory_occupation(list(MEMORY_TAGS))
        flags: list = [None] * dist.get_world_size()
        dist.all_gather_object(flags, dead)
        return any(flags) and self.restart

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


Backend = EmbeddedBackend | ServersBackend | ColocatedBackend


def _launch(cfg: Config, engine: int) -> ServerProcess:
    r = cfg.rollout
    host = r.sync_address or socket.gethostname()
    port = free_port(host)
    model = str(hf_directory(cfg.model.hf_config))
    gpus = None
    if torch.cuda.is_available():
        first = torch.cuda.current_device()
        gpus = list(range(first, first + r.server_tp))
    if r.server == "sglang":
        if r.weight_format == "fp8":
            served = Path(cfg.logging.output_dir) / f"rollout_server{engine}_model"
            model = str(write_served_fp8_model(model, served))
        command = sglang_command(
            model, port, r.server_tp, host, memory_saver=True, weight_format=r.weight_format
        )
    else:
        device = "cuda" if gpus else "cpu"
        command = [
            *embedded_command(model, port, host, device),
            *("--tp-size", str(r.server_tp), "--kv-cache-gb", str(r.kv_cache_gb)),
            "--cuda-graphs" if r.cuda_graphs else "--no-cuda-graphs",
        ]
    output = Path(cfg.logging.output_dir) / f"rollout_server{engine}.log"
    server = ServerProcess(
        command,
        f"http://{host}:{port}",
        output,
        cfg.parallel.timeout_s,
        gpus,
        request_timeout_s=r.request_timeout_s,
    )
    server.start()
    return server


def build_backend(cfg: Config, arch: ModelArch, device: torch.device) -> Backend:
    if cfg.rollout.engine == "servers":
        return ServersBackend(cfg, arch)
    if cfg.rollout.engine == "colocated":
        return ColocatedBackend(cfg, arch)
    return EmbeddedBackend(cfg, arch, device)


class RolloutLink:
    """The rollout backend as a run uses it (every method collective): weight sync and the
    memory hand-off, each tried once more after a dead server was restarted, and the
    recovery of a failed batch."""

    def __init__(self, backend: Backend, actor: Actor) -> None:
        self.backend, self.actor = backend, actor
        self.generation = backend.generation
        self.version = 0
        """The weight version the engine serves: the last one synced."""

    def sync(self, version: int) -> None:
        """Push the actor's weights into the engine as ``version``."""
        self.version = version
        retried(lambda: self.backend.sync(self.actor.chunks, version), self.restart_dead_servers)

    def release(self) -> None:
        """Before training: the engine's accelerator memory goes to the actor."""
        retried(self.backend.release, self.restart_dead_servers)

    def restart_dead_servers(self) -> bool:
        """After a rollout failure: whether a dead server was restarted (it holds no weights
        yet; a sync that failed is simply tried again)."""
        if not self.backend.restart_dead_servers():
            return False
        log.warning("a rollout server died and was restarted")
        return True

    def recover_rollouts(self) -> bool:
        """After a failed batch: restart dead servers and give them the weights the engine
        served; True when the batch may be sampled again."""
        if not self.restart_dead_servers():
            return False
        self.sync(self.version)
        return True
