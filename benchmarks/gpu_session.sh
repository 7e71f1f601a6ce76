#!/bin/bash
# The GPU measurements BENCHMARKS.md records, for a session with one H100. Each step writes its
# output to $OUT/<step>.log (default gpu-results/); a failing step is reported and the next one
# runs. Run it from the repository root, a few steps per call when calls are limited to 10
# minutes (build is quick once done and keeps the machine's editable install current):
#
#   bash benchmarks/gpu_session.sh build reposition generate
#   bash benchmarks/gpu_session.sh build actor packing
#   bash benchmarks/gpu_session.sh build iteration weight_sync
#   bash benchmarks/gpu_session.sh build sfpo
#
# Steps: build (CUDA extension + the CUDA-only tests), reposition (fused ops vs copy), generate
# (embedded engine, 0.5B shape, CUDA graphs vs eager), actor (training step, % of GEMM peak,
# peak memory vs plan), packing (packed vs padded micro-batches, 1.5B shape, 8k responses),
# iteration (one SFPO and one GRPO iteration of a 0.5B model by phase),
# weight_sync (weight sync of the 1.5B shape: in process, NCCL broadcast, CUDA IPC, vs a d2d copy,
# bf16 and fp8 rollout weights),
# sfpo (SFPO vs GRPO on the demo task, 3 seeds).
#
# The machine needs megatron-core; without network access carry its wheel (and only it: torch,
# numpy and packaging are there) in .whl/ of the repository root, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# transformers, safetensors and psutil must be installed already (the project is installed
# without its dependencies, so an older transformers there is used as is).
set -uo pipefail

OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {
    local name=$1
    shift
    echo "== $(date -Is) $name: $*" | tee -a "$OUT/$name.log"
    "$@" 2>&1 | tee -a "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || echo "!! $name: exit $status" | tee -a "$OUT/$name.log"
}

build() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pip install -q --no-deps --no-build-isolation -e . &&
        python3 -c "import sfpo_megatron.ops as o; print('ops backend:', o.backend())" &&
        python3 -m pytest -q -rs tests/test_ops.py tests/test_ops_snapshot.py \
            tests/test_embedded_engine.py
}

reposition() {
    python3 benchmarks/bench_reposition.py --check
    python3 benchmarks/bench_reposition.py --tensors 300
}

generate() {
    local shape=(--preset 0.5b --prompt-len 128 --new-tokens 256)
    python3 benchmarks/bench_generate.py "${shape[@]}" --batch 256
    python3 benchmarks/bench_generate.py "${shape[@]}" --batch 64
    python3 benchmarks/bench_generate.py "${shape[@]}" --batch 256 --no-cuda-graphs
    python3 benchmarks/bench_generate.py --long-tail --preset 0.5b --batch 512 --slots 128 \
        --prompt-len 512 --new-tokens 1024 --engines 1
}

actor() {
    python3 benchmarks/bench_actor.py --preset 0.5b --seq-length 2048 4096 --micro-batch-size 2
    python3 benchmarks/bench_actor.py --preset 1.5b --seq-length 2048 4096 --micro-batch-size 2
    python3 benchmarks/bench_actor.py --preset 1.5b --seq-length 4096 --micro-batch-size 2 \
        --attention local --steps 2
}

packing() {
    python3 benchmarks/bench_packing.py --preset 1.5b --max-response 8192 --rows 64
}

iteration() {
    python3 benchmarks/bench_iteration.py --preset 0.5b --prompts 32 --samples 8 \
        --prompt-len 256 --response-len 1024 --micro-batch-size 4 --out "$OUT/iteration"
}

weight_sync() {
    python3 benchmarks/bench_weight_sync.py --hidden 1536 --layers 28 --vocab 151936 --weight-format fp8
}

sfpo() {
    python3 benchmarks/sfpo_vs_grpo.py --seeds 1 2 3 --out "$OUT/compare"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build reposition generate actor iteration weight_sync sfpo)
for name in "${steps[@]}"; do
    step "$name" "$name"
done
echo "logs in $OUT/"
