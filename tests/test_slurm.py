"""The Slurm launch scripts of examples/slurm on a real Slurm: a two-node cluster on this host
(two slurmd on 127.0.0.1, CPU only, gloo). The colocated script trains across both nodes
through torchrun's c10d rendezvous, is stopped by USR1 (its --signal path) after checkpointing
the iteration it is in, requeues itself and resumes from that checkpoint; the disaggregated
script runs a heterogeneous job whose second node serves rollouts that the trainer on the
first samples from and pushes its weights to.

Slurm comes from Debian's packages (slurm-wlm, munge): the session fixture installs them when
sbatch is missing and this is root on an apt system, and the tests skip, saying why, when
Slurm can be neither installed nor started.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from string import Template

import pytest
import yaml

from sfpo_megatron.config import load_config
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.training.metrics import read_metrics
from sfpo_megatron.training.train_checkpoint import TRAINER_STATE, latest_complete

from conftest import REPO, TESTS, free_ports

SCRIPTS = REPO / "examples/slurm"
DEMO = REPO / "examples/configs/demo.yaml"
PACKAGES = ("slurm-wlm", "munge")
COMMANDS = ("sbatch", "scancel", "scontrol", "sinfo", "squeue", "srun", "slurmctld", "slurmd")
NODES = ("ci1", "ci2")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}
JOB_TIMEOUT_S = 240


def _run(
    command: list[str], timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _announce(request: pytest.FixtureRequest, message: str) -> None:
    """A line on the terminal even while pytest captures output."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(message)


@pytest.fixture(scope="session")
def slurm_installed(request: pytest.FixtureRequest) -> None:
    """Slurm's daemons and commands: there already, else installed with apt-get (root only)."""
    missing = [c for c in (*COMMANDS, "munged") if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is missing ({', '.join(missing)}) and installing it needs root + apt")
    _announce(request, f"test_slurm: installing {' '.join(PACKAGES)} with apt-get (once)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    start = time.monotonic()
    try:
        result = _run(install, 900, env)
        if result.returncode != 0:  # no or stale package lists
            _run(["apt-get", "update"], 900, env)
            result = _run(install, 900, env)
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get did not install Slurm within 15 minutes")
    if result.returncode != 0:
        pytest.skip(f"apt-get could not install Slurm:\n{result.stdout[-1500:]}{result.stderr}")
    _announce(request, f"test_slurm: Slurm installed in {time.monotonic() - start:.0f}s")


class Cluster:
    """munged, slurmctld and one slurmd per node of NODES, in the foreground as this process's
    children, every file under ``state``; ``env`` points Slurm's commands at it."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        base = free_ports(3)
        ports = {"ctld_port": base, "port1": base + 1, "port2": base + 2}
        conf = Template((TESTS / "slurm/slurm.conf.in").read_text()).substitute(
            state=self.state,
            host=host,
            node1=NODES[0],
            node2=NODES[1],
            first_job_id=random.randrange(1, 9000),
            **ports,
        )
        (self.state / "slurm.conf").write_text(conf)
        for directory in ("ctld", *(f"slurmd-{node}" for node in NODES)):
            (self.state / directory).mkdir()
        key = self.state / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon(
            "munged",
            ["munged", "--foreground", "--force", f"--key-file={key}"]
            + [f"--{kind}-file={self.state / f'munged.{kind}'}" for kind in ("pid", "log", "seed")]
            + [f"--socket={self.state / 'munge.socket'}"],
        )
        self._wait(lambda: (self.state / "munge.socket").exists(), 10, "munged's socket")
        conf_path = str(self.state / "slurm.conf")
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", conf_path])
        for node in NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-f", conf_path, "-N", node])
        self._wait(self.nodes_idle, 30, "both nodes idle")

    def _daemon(self, name: str, command: list[str]) -> None:
        with open(self.state / f"{name}.stderr", "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.daemons.append(process)
        time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} on start")

    def nodes_idle(self) -> bool:
        result = _run(["sinfo", "-h", "-N", "-o", "%N %t"], 10, self.env)
        states = dict(line.split() for line in result.stdout.splitlines())
        return result.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for process in self.daemons:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout}s")
            time.sleep(0.2)

    def command(self, *args: str, timeout: float = 30) -> str:
        result = _run(list(args), timeout, self.env)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}\n{self.logs()}"
            )
        return result.stdout

    def submit(self, options: list[str], script: Path, args: list[str], env: dict) -> int:
        """sbatch from the repository root (the scripts' SLURM_SUBMIT_DIR); the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**self.env, **env},
            cwd=REPO,
        )
        assert result.returncode == 0, f"sbatch failed: {result.stderr}\n{self.logs()}"
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` fields of the job (of its first component if heterogeneous)."""
        line = self.command("scontrol", "show", "job", "-o", str(job_id)).splitlines()[0]
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def wait_until(self, job_id: int, ready: Callable[[], bool], what: str, output: Path) -> None:
        """Poll ``ready``; fail at once with the logs if the job ends first, or on timeout."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not ready():
            info = self.job(job_id)
            if info["JobState"] in ENDED or time.monotonic() > deadline:
                raise AssertionError(
                    f"waiting for {what}: job {job_id} is {info['JobState']} "
                    f"({info['Reason']})\n{self.report(output)}"
                )
            time.sleep(0.5)

    def wait_ended(self, job_id: int, output: Path) -> str:
        """Wait for the job to end; its final state."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (info := self.job(job_id))["JobState"] not in ENDED:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {info['JobState']} ({info['Reason']})\n"
                    f"{self.report(output)}"
                )
            time.sleep(0.5)
        return info["JobState"]

    def report(self, *outputs: Path) -> str:
        """The tails of a job's output files and of the daemons' logs."""
        parts = [
            f"--- {path}:\n{path.read_text(errors='replace')[-6000:] if path.exists() else ''}"
            for path in outputs
        ]
        return "\n".join([*parts, self.logs()])

    def logs(self) -> str:
        parts = []
        for path in sorted(self.state.glob("*.log")) + sorted(self.state.glob("*.stderr")):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-25:])
            parts.append(f"--- {path.name}:\n{tail}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, then end the daemons (this process's children) by their ids."""
        if self.daemons and self.daemons[0].poll() is None:
            jobs = _run(["squeue", "-h", "-o", "%i"], 10, self.env).stdout.split()
            if jobs:
                _run(["scancel", *jobs], 10, self.env)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline
                    and _run(["squeue", "-h"], 10, self.env).stdout.strip()
                ):
                    time.sleep(0.5)
        for process in reversed(self.daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module")
def cluster(slurm_installed, tmp_path_factory, request) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("starting slurmd (SlurmUser=root) needs root")
    start = time.monotonic()
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"could not start a Slurm cluster: {error}\n{cluster.logs()}")
        _announce(request, f"test_slurm: cluster up in {time.monotonic() - start:.1f}s")
        yield cluster
    finally:
        cluster.stop()


def job_env(**extra: str) -> dict[str, str]:
    """What sbatch exports to the job: this Python first on PATH, one thread per rank."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {"PATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def run_config(path: Path, run: Path, **overrides: object) -> Path:
    """The demo config made small and pointed at ``run``, written out whole (absolute paths),
    so that a test can change it between a job's runs."""
    settings = {
        "train.iterations": 2,
        "train.prompts_per_step": 4,
        "train.samples_per_prompt": 4,
        "train.mini_batch_prompts": 2,
        "train.micro_batch_size": 4,
        "train.warm_start_steps": 0,
        "train.dynamic_sampling": False,
        "reward.workers": 0,
        "eval.interval": 0,
        "parallel.timeout_s": 120,  # a lost rank or server fails the job within the test
        "logging.log_interval": 1,
        "logging.output_dir": str(run / "log"),
        "checkpoint.dir": str(run / "ckpt"),
        "checkpoint.interval": 1,
        **overrides,
    }
    cfg = load_config(DEMO, [f"{key}={value}" for key, value in settings.items()])
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def last_logged(metrics: Path) -> int:
    """The last iteration in a metrics.jsonl; 0 before the first."""
    records = read_metrics(metrics) if metrics.exists() else []
    return records[-1]["iteration"] if records else 0


def newest_checkpoint(root: Path) -> int:
    """Iteration of the newest complete checkpoint under ``root``; 0 if none."""
    path = latest_complete(root)
    return int(path.name.removeprefix("iter_")) if path else 0


def test_colocated_two_nodes_requeued_by_usr1_resumes(cluster, tmp_path):
    """Two nodes x 1 rank (c10d rendezvous across slurmd). The first run would go on for
    1000 iterations and checkpoint only at the end; USR1 after its second iteration makes the
    batch shell create the stop file, the trainer checkpoint the iteration it is in and exit,
    and the job requeue itself. The requeued run (same job id and arguments, its config now
    asking for two more iterations) resumes right after that iteration: none is redone."""
    config = run_config(
        tmp_path / "run.yaml", tmp_path, **{"train.iterations": 1000, "checkpoint.interval": 1000}
    )
    output = tmp_path / "job.out"
    job = cluster.submit(
        ["--nodes=2", "--gpus-per-node=0", f"--output={output}"],
        SCRIPTS / "train_colocated.sbatch",
        [str(config)],
        job_env(NPROC_PER_NODE="1"),
    )
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "log/metrics.jsonl"
    started = time.monotonic()
    cluster.wait_until(job, lambda: last_logged(metrics) >= 2, "a second iteration", output)
    first_run_s = time.monotonic() - started
    cluster.command("scancel", "--batch", "--signal=USR1", str(job))

    def requeued() -> bool:
        info = cluster.job(job)
        return info["Restarts"] == "1" and info["JobState"] == "PENDING" and cluster.nodes_idle()

    cluster.wait_until(job, requeued, "the job requeued and its processes gone", output)
    k = last_logged(metrics)
    assert sorted(path.name for path in ckpt.glob("iter_*")) == [f"iter_{k:07d}"]
    assert newest_checkpoint(ckpt) == k and not (ckpt / "STOP").exists()
    run_config(config, tmp_path, **{"train.iterations": k + 2, "checkpoint.interval": 1000})
    # slurmd refuses a job started in the same second as its requeue (credential revoked),
    # which the 2 min hold skipped below otherwise rules out.
    time.sleep(2)
    cluster.command("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the 2 min hold
    started = time.monotonic()
    assert cluster.wait_ended(job, output) == "COMPLETED", cluster.report(output)
    print(
        f"first run to the stop after iteration {k}: {first_run_s:.0f}s; "
        f"resumed: {time.monotonic() - started:.0f}s"
    )
    log = output.read_text()

    assert "trainer: 2 node(s) (ci[1-2]) x 1 ranks" in log and "restart 1" in log, log
    assert f"USR1: asking the trainer to checkpoint and stop ({ckpt / 'STOP'})" in log
    assert f"stopped on request after iteration {k} of 1000" in log
    assert "USR1: the trainer checkpointed the iteration it was in and stopped" in log
    assert f"USR1: requeueing job {job}" in log
    assert f"resuming from {ckpt / f'iter_{k:07d}'}" in log
    assert [m["iteration"] for m in read_metrics(metrics)] == list(range(1, k + 3))
    assert newest_checkpoint(ckpt) == k + 2
    assert (ckpt / f"iter_{k + 2:07d}" / TRAINER_STATE).is_file()


def test_disaggregated_het_job_serves_rollouts_from_its_own_node(cluster, tmp_path):
    """Het group 0 (node ci1): the trainer, 2 ranks (TP2); het group 1 (ci2): two rollout
    servers, each sampling half of the prompts. Rollout log-probs equal the trainer's at every
    iteration: both servers sampled from the weights the trainer pushed to them."""
    config = run_config(tmp_path / "run.yaml", tmp_path, **{"parallel.tensor": 2})
    output = tmp_path / "job.out"
    port = free_ports(4)  # two rollout servers, then two weight-sync groups
    job = cluster.submit(
        ["--gpus-per-node=0", f"--output={output}", ":", "--gpus-per-node=0"],
        SCRIPTS / "train_disaggregated.sbatch",
        [str(config), f"rollout.sync_port={port + 2}"],
        job_env(
            NPROC_PER_NODE="2",
            GPUS_PER_NODE="2",
            ROLLOUT_ENGINE="embedded",
            ROLLOUT_PORT=str(port),
            ROLLOUT_LOG=str(tmp_path / "rollout-%t.out"),
        ),
    )
    state = cluster.wait_ended(job, output)
    servers = [tmp_path / f"rollout-{task}.out" for task in (0, 1)]
    assert state == "COMPLETED", cluster.report(output, *servers)
    log = output.read_text()

    model = hf_directory(load_config(config).model.hf_config)
    urls = f"[http://127.0.0.1:{port},http://127.0.0.1:{port + 1}]"
    assert f"rollout: 2 embedded server(s) of {model} on ci2: {urls}" in log
    assert "trainer: 1 node(s) (ci1) x 2 ranks" in log
    for task, server_log in enumerate(servers):
        assert f"rollout server {task} on port {port + task}" in server_log.read_text()
    metrics = read_metrics(tmp_path / "log/metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert [m["weight_version"] for m in metrics] == [1, 2]
    assert all(m["rollout_logprob_gap"] < 1e-4 for m in metrics), metrics


def test_rollout_server_gpu_slots():
    """Server i of a node takes the i-th group of TP devices of those Slurm gave the step
    (Slurm's numbering kept); a slot beyond them is refused, naming the fix."""
    spec = importlib.util.spec_from_file_location("rollout_server", SCRIPTS / "rollout_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    visible = "4,5,6,7,0,1,2,3"
    assert [module.task_gpus(visible, i, 2) for i in range(4)] == ["4,5", "6,7", "0,1", "2,3"]
    assert module.task_gpus(visible, 7, 1) == "3"
    with pytest.raises(SystemExit, match="lower --ntasks-per-node or --tp"):
        module.task_gpus(visible, 2, 4)
