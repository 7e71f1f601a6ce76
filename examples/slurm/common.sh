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

# Requeue the job when Slurm sends USR1 ahead of the time limit (#SBATCH --signal=B:USR1@S,
# B: = to this batch shell only). Slurm then stops the job steps and starts the job again
# (same id, same arguments) once it is eligible; it resumes from its newest complete
# checkpoint, so at most checkpoint.interval iterations are redone. Bash runs the trap only
# between commands, so the scripts start srun in the background and wait for it.
sfpo_requeue_on_usr1() {
    trap 'echo "$(date -Is) USR1: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
}
