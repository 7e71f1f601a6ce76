# Shared by the sbatch scripts of this directory (sourced from the repository root, never run).
# Every setting below is an environment variable: export it where you submit (sbatch passes
# the environment on to the job) or set it here.

# ---------------------------------------------------------------- site network settings
# Which interface NCCL's bootstrap and socket transport use (e.g. ib0, eth0, ens; a
# leading ^ excludes: ^lo,docker). Unset: NCCL picks one, which can be a management
# network that is slow or not routed between nodes.
# export NCCL_SOCKET_IFNAME=ib0
# export GLOO_SOCKET_IFNAME=ib0
# The InfiniBand / RoCE adapters NCCL may use (e.g. mlx5_0,mlx5_1; ^mlx5_4 excludes one).
# export NCCL_IB_HCA=mlx5
# WARN by default; INFO prints the rings, transports and interfaces NCCL chose (set it for
# the first run on a new cluster).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A collective that fails or times out (after parallel.timeout_s) tears the process down
# instead of hanging, so srun --kill-on-bad-exit ends the job rather than letting it idle
# until its time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# Address of a Slurm node as Slurm itself reaches it (its NodeAddr: the host name unless the
# site configured an address).
sfpo_node_addr() {
    scontrol show node "$1" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'
}

# sfpo_srun_trainer NODELIST CONFIG [KEY=VALUE ...]
# The trainer on every node of NODELIST: srun starts one torchrun per node, which starts
# NPROC_PER_NODE ranks; the torchruns meet in torchrun's c10d rendezvous on the first node
# (RDZV_HOST:RDZV_PORT) and number the nodes themselves (torchrun ignores --node_rank for
# c10d, so SLURM_NODEID is not passed). checkpoint.resume=auto comes before the overrides:
# a requeued job continues from its newest complete checkpoint unless they say otherwise.
# Extra srun options (e.g. --het-group=0): SFPO_SRUN_OPTS.
sfpo_srun_trainer() {
    local nodelist=$1 config=$2
    shift 2
    local nodes head
    nodes=$(scontrol show hostnames "$nodelist" | wc -l)
    head=$(scontrol show hostnames "$nodelist" | head -n 1)
    local host=${RDZV_HOST:-$(sfpo_node_addr "$head")}
    # From the job id: two jobs sharing a node do not collide, a requeued job (same id) gets
    # the same port, and 20000-28999 stays clear of the ephemeral ports, rollout.sync_port
    # (29900) and SGLang's (30000).
    local port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 9000))}
    echo "$(date -Is) trainer: $nodes node(s) ($nodelist) x ${NPROC_PER_NODE} ranks," \
        "rendezvous $host:$port, restart ${SLURM_RESTART_COUNT:-0}"
    # shellcheck disable=SC2086  # SFPO_SRUN_OPTS is a list of options
    srun ${SFPO_SRUN_OPTS:-} --nodelist="$nodelist" --nodes="$nodes" --ntasks="$nodes" \
        --ntasks-per-node=1 \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" --kill-on-bad-exit=1 \
        "${PYTHON:-python}" -m torch.distributed.run \
        --nnodes="$nodes" --nproc_per_node="$NPROC_PER_NODE" \
        --rdzv_backend=c10d --rdzv_endpoint="$host:$port" --rdzv_id="sfpo-$SLURM_JOB_ID" \
        --max_restarts=0 \
        -m sfpo_megatron.cli train "$config" checkpoint.resume=auto "$@"
}

# ---------------------------------------------------------------- stop, checkpoint, requeue
# #SBATCH --signal=B:USR1@S makes Slurm send USR1 to this batch shell (B: only to it) S seconds
# before the time limit. The trap creates the trainer's stop file (checkpoint.stop_file, by
# default STOP in checkpoint.dir): at the end of the iteration it is in, the trainer saves a
# checkpoint of it and exits. Then, or SFPO_STOP_GRACE_S seconds after the signal if the
# trainer is still running, the job requeues itself (same id and arguments) and resumes from
# that checkpoint. A file, not a signal to the job step: the step's torchrun would die of USR1
# and take the ranks with it. S must exceed one iteration plus one checkpoint save plus a
# minute or two for the requeue; SFPO_STOP_GRACE_S (default 780) must stay below S.

# sfpo_stop_on_usr1 CONFIG [KEY=VALUE ...]: install the trap for this run's stop file, read
# from the config as the trainer reads it. Without one (the stop file off, or a config that
# does not load: the trainer then stops with the reason), USR1 requeues at once.
sfpo_stop_on_usr1() {
    SFPO_STOP_FILE=$("${PYTHON:-python}" -c '
import sys
from sfpo_megatron.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).checkpoint.stop_path or "")' "$@") ||
        SFPO_STOP_FILE=
    SFPO_STOP_DEADLINE=
    echo "$(date -Is) stop file: ${SFPO_STOP_FILE:-none, USR1 requeues at once}"
    trap _sfpo_on_usr1 USR1
}

_sfpo_on_usr1() {
    [[ -z $SFPO_STOP_DEADLINE ]] || return 0  # asked already
    if [[ -n $SFPO_STOP_FILE ]]; then
        echo "$(date -Is) USR1: asking the trainer to checkpoint and stop ($SFPO_STOP_FILE)"
        mkdir -p "$(dirname "$SFPO_STOP_FILE")"
        touch "$SFPO_STOP_FILE"
        SFPO_STOP_DEADLINE=$((SECONDS + ${SFPO_STOP_GRACE_S:-780}))
    else
        SFPO_STOP_DEADLINE=$SECONDS
    fi
}

# sfpo_wait_trainer TRAINER [SERVERS]: wait for the trainer (the pid of a background srun)
# and return its exit status (124 when it outlived the grace after USR1). Rollout servers (the
# pid of their srun) that exit first stop the trainer, which would otherwise wait for them
# until its timeout. Sleeping in the background keeps the USR1 trap responsive.
sfpo_wait_trainer() {
    local trainer=$1 servers=${2:-} status=0
    while kill -0 "$trainer" 2>/dev/null; do
        if [[ -n $SFPO_STOP_DEADLINE ]] && ((SECONDS >= SFPO_STOP_DEADLINE)); then
            return 124
        fi
        if [[ -n $servers ]] && ! kill -0 "$servers" 2>/dev/null; then
            echo "$(date -Is) the rollout servers exited; stopping the trainer" >&2
            kill "$trainer" 2>/dev/null || true
        fi
        sleep 1 &
        wait $! || true
    done
    wait "$trainer" || status=$?
    return "$status"
}

# sfpo_requeue_if_asked STATUS: after USR1, requeue the job unless the trainer finished
# training (STATUS 0). Whether it checkpointed shows in the stop file, not in STATUS (torchrun
# exits 1 whatever status its ranks exit with): the trainer removes the file once its
# checkpoint is complete. A file it did not act on is removed here, or the requeued run would
# stop after its first iteration.
sfpo_requeue_if_asked() {
    local status=$1
    [[ -n $SFPO_STOP_DEADLINE ]] || return 0
    if ((status == 0)); then
        rm -f "$SFPO_STOP_FILE"  # created after the trainer's last look
        echo "$(date -Is) USR1: the trainer finished training; not requeueing"
        return 0
    fi
    if [[ -z $SFPO_STOP_FILE ]]; then
        echo "$(date -Is) USR1: no stop file; the work since the last checkpoint will be redone"
    elif [[ -e $SFPO_STOP_FILE ]]; then
        rm -f "$SFPO_STOP_FILE"
        echo "$(date -Is) USR1: the trainer did not stop in time (status $status); the work" \
            "since its last checkpoint will be redone"
    else
        echo "$(date -Is) USR1: the trainer checkpointed the iteration it was in and stopped"
    fi
    echo "$(date -Is) USR1: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
}
