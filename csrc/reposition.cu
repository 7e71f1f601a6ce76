// Multi-tensor CUDA reposition kernel (no torch headers; see reposition.h for the arithmetic).
//
// The fp32 steps use the __fsub_rn/__fmul_rn/__fadd_rn intrinsics, which nvcc never contracts
// into an FMA, and the build also passes --fmad=false so no other expression is fused behind our
// back. Torch's own CUDA kernels round each of sub_/mul_/add_ separately, so results match them
// bit for bit (CUDA arithmetic always produces the canonical NaN, as torch's kernels do).
//
// One launch covers many tensors: every block handles one chunk of one tensor, described in a
// struct passed by value as the kernel argument (kept below the classic 4 KiB parameter limit).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "reposition.h"

namespace sfpo {
namespace {

constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;  // Elements per block; a multiple of 4 keeps chunk alignment.
constexpr int kThreads = 512;

struct Batch {
  float* main[kMaxTensors];
  const float* snap[kMaxTensors];
  void* model[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk[kMaxBlocks];
  uint8_t tensor[kMaxBlocks];
};
static_assert(sizeof(Batch) + sizeof(float) <= 4096, "kernel arguments must stay below 4 KiB");

// Four model values, aligned so that one 8- or 16-byte store writes them.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

__device__ __forceinline__ float reposition_value(float main, float snap, float alpha) {
  return __fadd_rn(__fmul_rn(alpha, __fsub_rn(main, snap)), snap);
}

template <typename Out>
__device__ __forceinline__ Out convert(float v);

template <>
__device__ __forceinline__ float convert<float>(float v) {
  return v;
}

template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <>
__device__ __forceinline__ __half convert<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Out is float, __nv_bfloat16 or __half; void means "no model output".
template <typename Out>
__global__ void __launch_bounds__(kThreads) reposition_kernel(Batch batch, float alpha) {
  const int t = batch.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(batch.chunk[blockIdx.x]) * kChunk;
  const int64_t remaining = batch.numel[t] - start;
  const int64_t n = remaining < kChunk ? remaining : kChunk;
  float* main = batch.main[t] + start;
  const float* snap = batch.snap[t] + start;
  Out* model = nullptr;
  if constexpr (!std::is_void_v<Out>) {
    model = static_cast<Out*>(batch.model[t]) + start;
  }

  bool vectorised = aligned_to(main, 16) && aligned_to(snap, 16);
  if constexpr (!std::is_void_v<Out>) {
    vectorised = vectorised && aligned_to(model, alignof(Vec4<Out>));
  }

  int64_t tail_begin = 0;
  if (vectorised) {
    const int64_t n4 = n / 4;
    float4* main4 = reinterpret_cast<float4*>(main);
    const float4* snap4 = reinterpret_cast<const float4*>(snap);
    for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
      float4 m = main4[i];
      const float4 s = snap4[i];
      m.x = reposition_value(m.x, s.x, alpha);
      m.y = reposition_value(m.y, s.y, alpha);
      m.z = reposition_value(m.z, s.z, alpha);
      m.w = reposition_value(m.w, s.w, alpha);
      main4[i] = m;
      if constexpr (!std::is_void_v<Out>) {
        Vec4<Out> out;
        out.v[0] = convert<Out>(m.x);
        out.v[1] = convert<Out>(m.y);
        out.v[2] = convert<Out>(m.z);
        out.v[3] = convert<Out>(m.w);
        reinterpret_cast<Vec4<Out>*>(model)[i] = out;
      }
    }
    tail_begin = n4 * 4;
  }
  // Scalar path: the last n % 4 elements, or the whole chunk when a pointer is misaligned.
  for (int64_t i = tail_begin + threadIdx.x; i < n; i += blockDim.x) {
    const float v = reposition_value(main[i], snap[i], alpha);
    main[i] = v;
    if constexpr (!std::is_void_v<Out>) {
      model[i] = convert<Out>(v);
    }
  }
}

template <typename Out>
const char* launch_all(float* const* main, const float* const* snap, void* const* model,
                       const int64_t* numel, int64_t count, float alpha, cudaStream_t stream) {
  Batch batch;
  int tensors = 0;
  int blocks = 0;
  auto launch = [&]() -> const char* {
    reposition_kernel<Out><<<blocks, kThreads, 0, stream>>>(batch, alpha);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  };
  auto add_tensor = [&](int64_t i) {
    batch.main[tensors] = main[i];
    batch.snap[tensors] = snap[i];
    batch.model[tensors] = model == nullptr ? nullptr : model[i];
    batch.numel[tensors] = numel[i];
    ++tensors;
  };

  for (int64_t i = 0; i < count; ++i) {
    if (numel[i] == 0) {
      continue;
    }
    add_tensor(i);
    const int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      batch.tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      batch.chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      if (blocks == kMaxBlocks) {
        if (const char* err = launch()) {
          return err;
        }
        blocks = 0;
        tensors = 0;
        if (c + 1 < chunks) {  // The rest of this tensor continues in the next launch.
          add_tensor(i);
        }
      }
    }
    if (tensors == kMaxTensors) {
      if (blocks > 0) {
        if (const char* err = launch()) {
          return err;
        }
      }
      blocks = 0;
      tensors = 0;
    }
  }
  return blocks > 0 ? launch() : nullptr;
}

}  // namespace

const char* reposition_cuda(float* const* main, const float* const* snap, void* const* model,
                            const int64_t* numel, int64_t count, ModelDtype dtype, float alpha,
                            void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ModelDtype::kNone:
      return launch_all<void>(main, snap, model, numel, count, alpha, s);
    case ModelDtype::kFloat32:
      return launch_all<float>(main, snap, model, numel, count, alpha, s);
    case ModelDtype::kBFloat16:
      return launch_all<__nv_bfloat16>(main, snap, model, numel, count, alpha, s);
    case ModelDtype::kFloat16:
      return launch_all<__half>(main, snap, model, numel, count, alpha, s);
  }
  return "sfpo::reposition_cuda: unknown model dtype";
}

}  // namespace sfpo
