// Torch-free interface of the SFPO "reposition" kernels.
//
// SFPO moves the fp32 master weights back towards the slow snapshot in place:
//
//     d    = main - snap          (fp32, rounded)
//     t    = alpha * d            (fp32, rounded; alpha is rounded to fp32 first)
//     main = t + snap             (fp32, rounded)
//
// Three separately rounded IEEE-754 binary32 operations, never fused into an FMA. This is exactly
// what torch computes for `main.sub_(snap).mul_(alpha).add_(snap)` on fp32 tensors, so the
// pure-torch fallback is bit-identical (see sfpo_megatron/ops/_fallback.py).
//
// In the same pass the new main value is optionally written, rounded to nearest even, into the
// low-precision model parameter (bf16, fp16 or an fp32 copy). Keeping this header free of torch
// and CUDA includes lets the kernels be built and tested on their own.
#pragma once

#include <cstdint>

namespace sfpo {

// Element type of the model-parameter output; kNone means "update main only".
enum class ModelDtype : int32_t { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Updates elements [begin, end) of one tensor on the CPU. `model` may be null only with
// ModelDtype::kNone; for kFloat32 it may alias `main`. Callers parallelise by splitting ranges.
void reposition_cpu(float* main, const float* snap, void* model, ModelDtype dtype, float alpha,
                    int64_t begin, int64_t end);

// Updates `count` tensors (all with the same model dtype) with as few kernel launches as possible
// on `stream` (a cudaStream_t). Returns nullptr on success, else a static CUDA error string.
// Only defined when the extension is built with CUDA.
const char* reposition_cuda(float* const* main, const float* const* snap, void* const* model,
                            const int64_t* numel, int64_t count, ModelDtype dtype, float alpha,
                            void* stream);

}  // namespace sfpo
