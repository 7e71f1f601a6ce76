// Thin torch binding for the reposition kernels: validates arguments, then hands raw pointers to
// the torch-free CPU kernel or the CUDA launcher (compiled in when SFPO_WITH_CUDA is defined).
// The snapshot copy is plain memcpy / cudaMemcpyAsync and lives here entirely.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#ifdef SFPO_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "reposition.h"

namespace {

using TensorList = std::vector<at::Tensor>;

// Elements per CPU task; below this a tensor is processed on the calling thread.
constexpr int64_t kCpuGrain = 32768;

// check_inputs admits only float32, bfloat16 and float16 model tensors.
sfpo::ModelDtype model_dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) {
    return sfpo::ModelDtype::kBFloat16;
  }
  if (t.scalar_type() == at::kHalf) {
    return sfpo::ModelDtype::kFloat16;
  }
  return sfpo::ModelDtype::kFloat32;
}

// Same checks, order and wording as sfpo_megatron/ops/_fallback.py::check_inputs.
void check_inputs(const TensorList& main, const TensorList& snap,
                  const std::optional<TensorList>& model) {
  TORCH_CHECK_VALUE(main.size() == snap.size(),
                    "reposition_: main and snap must have the same length, got ", main.size(),
                    " and ", snap.size());
  TORCH_CHECK_VALUE(!model || model->size() == main.size(),
                    "reposition_: model must have the same length as main, got ",
                    model ? model->size() : 0, " and ", main.size());
  for (size_t i = 0; i < main.size(); ++i) {
    TORCH_CHECK_TYPE(main[i].scalar_type() == at::kFloat, "reposition_: main[", i,
                     "] must be float32, got ", main[i].scalar_type());
    TORCH_CHECK_TYPE(snap[i].scalar_type() == at::kFloat, "reposition_: snap[", i,
                     "] must be float32, got ", snap[i].scalar_type());
    if (model) {
      const auto dtype = (*model)[i].scalar_type();
      TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                       "reposition_: model[", i, "] must be float32, bfloat16 or float16, got ",
                       dtype);
    }
    TORCH_CHECK_VALUE(main[i].device() == main[0].device(), "reposition_: main[", i,
                      "] is on ", main[i].device(), " but main[0] is on ", main[0].device());
    TORCH_CHECK_VALUE(snap[i].device() == main[0].device(), "reposition_: snap[", i,
                      "] is on ", snap[i].device(), " but main[0] is on ", main[0].device());
    if (model) {
      TORCH_CHECK_VALUE((*model)[i].device() == main[0].device(), "reposition_: model[", i,
                        "] is on ", (*model)[i].device(), " but main[0] is on ",
                        main[0].device());
    }
    TORCH_CHECK_VALUE(snap[i].numel() == main[i].numel(), "reposition_: snap[", i, "] has ",
                      snap[i].numel(), " elements but main[", i, "] has ", main[i].numel());
    if (model) {
      TORCH_CHECK_VALUE((*model)[i].numel() == main[i].numel(), "reposition_: model[", i,
                        "] has ", (*model)[i].numel(), " elements but main[", i, "] has ",
                        main[i].numel());
    }
    TORCH_CHECK_VALUE(main[i].is_contiguous(), "reposition_: main[", i,
                      "] must be contiguous");
    TORCH_CHECK_VALUE(snap[i].is_contiguous(), "reposition_: snap[", i,
                      "] must be contiguous");
    if (model) {
      TORCH_CHECK_VALUE((*model)[i].is_contiguous(), "reposition_: model[", i,
                        "] must be contiguous");
    }
  }
}

void run_cpu(const TensorList& main, const TensorList& snap, const std::optional<TensorList>& model,
             float alpha) {
  for (size_t i = 0; i < main.size(); ++i) {
    float* main_ptr = main[i].data_ptr<float>();
    const float* snap_ptr = snap[i].data_ptr<float>();
    void* model_ptr = model ? (*model)[i].data_ptr() : nullptr;
    const auto dtype = model ? model_dtype_of((*model)[i]) : sfpo::ModelDtype::kNone;
    at::parallel_for(0, main[i].numel(), kCpuGrain, [&](int64_t begin, int64_t end) {
      sfpo::reposition_cpu(main_ptr, snap_ptr, model_ptr, dtype, alpha, begin, end);
    });
  }
}

#ifdef SFPO_WITH_CUDA
// One launcher call per model dtype present; each call packs its tensors into few launches.
void run_cuda(const TensorList& main, const TensorList& snap,
              const std::optional<TensorList>& model, float alpha) {
  const c10::cuda::CUDAGuard guard(main[0].device());
  void* stream = c10::cuda::getCurrentCUDAStream(main[0].device().index()).stream();
  for (const auto dtype : {sfpo::ModelDtype::kNone, sfpo::ModelDtype::kFloat32,
                           sfpo::ModelDtype::kBFloat16, sfpo::ModelDtype::kFloat16}) {
    std::vector<float*> main_ptrs;
    std::vector<const float*> snap_ptrs;
    std::vector<void*> model_ptrs;
    std::vector<int64_t> numels;
    for (size_t i = 0; i < main.size(); ++i) {
      const auto tensor_dtype = model ? model_dtype_of((*model)[i]) : sfpo::ModelDtype::kNone;
      if (tensor_dtype != dtype) {
        continue;
      }
      main_ptrs.push_back(main[i].data_ptr<float>());
      snap_ptrs.push_back(snap[i].data_ptr<float>());
      model_ptrs.push_back(model ? (*model)[i].data_ptr() : nullptr);
      numels.push_back(main[i].numel());
    }
    if (numels.empty()) {
      continue;
    }
    const char* err = sfpo::reposition_cuda(main_ptrs.data(), snap_ptrs.data(), model_ptrs.data(),
                                            numels.data(), static_cast<int64_t>(numels.size()),
                                            dtype, alpha, stream);
    TORCH_CHECK(err == nullptr, "reposition_: CUDA kernel launch failed: ", err);
  }
}
#endif

void reposition_(const TensorList& main, const TensorList& snap,
                 const std::optional<TensorList>& model, double alpha) {
  check_inputs(main, snap, model);
  if (main.empty()) {
    return;
  }
  // Torch evaluates fp32 ops with a Python-float scalar in fp32, so round alpha the same way.
  const float alpha_f = static_cast<float>(alpha);
  const auto device = main[0].device();
  if (device.is_cpu()) {
    run_cpu(main, snap, model, alpha_f);
  } else if (device.is_cuda()) {
#ifdef SFPO_WITH_CUDA
    run_cuda(main, snap, model, alpha_f);
#else
    TORCH_CHECK(false,
                "reposition_: got CUDA tensors but sfpo_megatron._C was built without CUDA; "
                "rebuild with SFPO_BUILD_CUDA=1 pip install --no-build-isolation -e .");
#endif
  } else {
    TORCH_CHECK(false, "reposition_: tensors on ", device, " are not supported");
  }
  // Mirror torch's in-place ops so autograd notices the modification.
  for (size_t i = 0; i < main.size(); ++i) {
    main[i].unsafeGetTensorImpl()->bump_version();
    if (model) {
      (*model)[i].unsafeGetTensorImpl()->bump_version();
    }
  }
}

// Same checks, order and wording as sfpo_megatron/ops/_fallback.py::check_snapshot_inputs (and
// layout.py::check_flat). Returns the number of elements to copy.
int64_t check_snapshot_inputs(const TensorList& srcs, const at::Tensor& flat) {
  int64_t total = 0;
  for (size_t i = 0; i < srcs.size(); ++i) {
    TORCH_CHECK_TYPE(srcs[i].scalar_type() == at::kFloat, "snapshot_: srcs[", i,
                     "] must be float32, got ", srcs[i].scalar_type());
    TORCH_CHECK_VALUE(srcs[i].device() == srcs[0].device(), "snapshot_: srcs[", i, "] is on ",
                      srcs[i].device(), " but srcs[0] is on ", srcs[0].device());
    TORCH_CHECK_VALUE(srcs[i].is_contiguous(), "snapshot_: srcs[", i, "] must be contiguous");
    total += srcs[i].numel();
  }
  if (!srcs.empty()) {
    const bool host_copy = srcs[0].is_cuda() && flat.is_cpu();
    TORCH_CHECK_VALUE(flat.device() == srcs[0].device() || host_copy, "snapshot_: flat is on ",
                      flat.device(), " but srcs[0] is on ", srcs[0].device(),
                      "; flat must be on the same device, or on the CPU for CUDA srcs");
  }
  TORCH_CHECK_TYPE(flat.scalar_type() == at::kFloat, "snapshot_: flat must be float32, got ",
                   flat.scalar_type());
  TORCH_CHECK_VALUE(flat.dim() == 1, "snapshot_: flat must be 1-D, got shape ", flat.sizes());
  TORCH_CHECK_VALUE(flat.is_contiguous(), "snapshot_: flat must be contiguous");
  TORCH_CHECK_VALUE(flat.numel() >= total, "snapshot_: flat has ", flat.numel(),
                    " elements but ", total, " are needed");
  return total;
}

// Splits the flat range (not the tensor list) across threads, so that one large tensor is copied
// by every core and many small ones are shared out; each task copies the pieces it covers.
void snapshot_cpu(const TensorList& srcs, float* flat, int64_t total) {
  std::vector<int64_t> starts(srcs.size() + 1, 0);  // flat offset of each src, then the total
  std::vector<const float*> ptrs(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) {
    starts[i + 1] = starts[i] + srcs[i].numel();
    ptrs[i] = srcs[i].data_ptr<float>();
  }
  at::parallel_for(0, total, kCpuGrain, [&](int64_t begin, int64_t end) {
    // The last src starting at or before `begin` holds it (empty srcs share its start).
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; begin < end; ++i) {
      const int64_t stop = std::min(end, starts[i + 1]);
      if (stop > begin) {
        std::memcpy(flat + begin, ptrs[i] + (begin - starts[i]), (stop - begin) * sizeof(float));
        begin = stop;
      }
    }
  });
}

#ifdef SFPO_WITH_CUDA
// Queued on the current stream. A device-to-pageable-host copy blocks until done (CUDA semantics).
void snapshot_cuda(const TensorList& srcs, const at::Tensor& flat) {
  const c10::cuda::CUDAGuard guard(srcs[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(srcs[0].device().index()).stream();
  const cudaMemcpyKind kind = flat.is_cpu() ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
  float* dst = flat.data_ptr<float>();
  for (const auto& src : srcs) {
    if (src.numel() > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(dst, src.data_ptr<float>(), src.numel() * sizeof(float), kind,
                                     stream));
      dst += src.numel();
    }
  }
}
#endif

void snapshot_(const TensorList& srcs, const at::Tensor& flat) {
  const int64_t total = check_snapshot_inputs(srcs, flat);
  if (srcs.empty()) {
    return;
  }
  const auto device = srcs[0].device();
  if (device.is_cpu()) {
    snapshot_cpu(srcs, flat.data_ptr<float>(), total);
  } else if (device.is_cuda()) {
#ifdef SFPO_WITH_CUDA
    snapshot_cuda(srcs, flat);
#else
    TORCH_CHECK(false,
                "snapshot_: got CUDA tensors but sfpo_megatron._C was built without CUDA; "
                "rebuild with SFPO_BUILD_CUDA=1 pip install --no-build-isolation -e .");
#endif
  } else {
    TORCH_CHECK(false, "snapshot_: tensors on ", device, " are not supported");
  }
  flat.unsafeGetTensorImpl()->bump_version();
}

bool has_cuda() {
#ifdef SFPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for (setup.py passes it in); "" without.
std::string cuda_archs() {
#ifdef SFPO_WITH_CUDA
  return SFPO_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SFPO fused ops (C++/CUDA).";
  m.def("reposition_", &reposition_, py::arg("main"), py::arg("snap"), py::arg("model"),
        py::arg("alpha"), py::call_guard<py::gil_scoped_release>(),
        "In place: main = snap + alpha * (main - snap) in fp32; model = main rounded to its dtype.");
  m.def("snapshot_", &snapshot_, py::arg("srcs"), py::arg("flat"),
        py::call_guard<py::gil_scoped_release>(),
        "Copy the fp32 srcs back to back into flat from offset 0 (async on CUDA's current stream).");
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("cuda_archs", &cuda_archs,
        "The CUDA architectures the kernels were built for (TORCH_CUDA_ARCH_LIST syntax).");
}
