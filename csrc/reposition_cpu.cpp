// CPU reposition kernel (plain C++17, no torch dependency).
//
// Must be compiled with -ffp-contract=off: GCC's default for C++ is -ffp-contract=fast, which
// may fuse `alpha * d + snap` into one FMA (e.g. in the AVX2 clone below), rounding once instead
// of twice and breaking bit-identity with torch's separately rounded sub_/mul_/add_. The flag is
// a translation-unit option, so it holds in every clone.
//
// Speed: every step, conversions included, is branch-free integer or float arithmetic on one
// element, so the compiler vectorizes each loop. On x86-64 each loop is compiled three times
// (AVX-512F, AVX2 and the baseline ISA, via target_clones) and the dynamic loader picks the
// widest the CPU supports, as torch's own kernels do at run time.
#include <cstring>

#include "reposition.h"

// Clones need the ELF ifunc mechanism (Linux); elsewhere the baseline loop alone is built.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define SFPO_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef SFPO_ISA_CLONES
#define SFPO_ISA_CLONES
#endif

// Helpers are forced inline so that each clone compiles them for its own ISA.
#define SFPO_INLINE inline __attribute__((always_inline))

namespace sfpo {
namespace {

// torch's AVX2/AVX512 float->bf16 kernels (ATen/cpu/vec/vec{256,512}/*bfloat16*.h) write 0xFFFF
// for every NaN; matching them keeps `.to(torch.bfloat16)` bit-identical on x86 CPUs.
constexpr uint32_t kBFloat16NaN = 0xFFFF;

SFPO_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// The three separately rounded fp32 steps documented in reposition.h.
SFPO_INLINE float reposition_value(float main, float snap, float alpha) {
  const float d = main - snap;
  const float t = alpha * d;
  return t + snap;
}

// `condition ? a : b` as bit masks, which the vectorizer takes even in a chain of selects (GCC
// turns a chain of ?: into branches, and a loop with branches stays scalar).
SFPO_INLINE uint32_t select(bool condition, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (a & mask) | (b & ~mask);
}

// Round-to-nearest-even truncation of the low 16 bits; overflow rounds into the inf encoding.
SFPO_INLINE uint16_t float_to_bfloat16_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select((u & 0x7FFFFFFFu) > 0x7F800000u, kBFloat16NaN, rounded));
}

// IEEE binary16 with round-to-nearest-even, overflow to inf and gradual underflow. NaNs stay quiet
// NaNs keeping sign and the top payload bits, as the F16C instruction (and torch) does. Every
// case is computed and one is selected, so the loop calling this vectorizes.
SFPO_INLINE uint16_t float_to_half_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t nan = sign | 0x7E00u | ((a >> 13) & 0x3FFu);
  const uint32_t inf = sign | 0x7C00u;
  // Normal half: rebias exponent 127 -> 15 and round (meaningful for a >= 2^-14).
  const uint32_t m = a - 0x38000000u;
  const uint32_t normal = sign | ((m + 0xFFFu + ((m >> 13) & 1u)) >> 13);
  // Subnormal half (a < 2^-14): |x| / 2^-24 rounded to an integer, by the fp32 addition of 0.5,
  // whose ulp is 2^-24: the addition rounds to nearest even, and a carry into 0x400 is the
  // smallest normal. Exact below 2^-25 too (ties to zero); fp32 subnormal inputs give 0 even if
  // the caller flushes denormals.
  float magnitude;
  std::memcpy(&magnitude, &a, sizeof(magnitude));
  const uint32_t subnormal = sign | (float_bits(magnitude + 0.5f) - 0x3F000000u);
  uint32_t h = select(a >= 0x38800000u, normal, subnormal);
  h = select(a >= 0x477FF000u, inf, h);  // >= 65520 (halfway past the max half 65504)
  return static_cast<uint16_t>(select(a > 0x7F800000u, nan, h));
}

// One loop per output type, each cloned per ISA. `out` may alias `main` (fp32 model), so no
// restrict: the compiler checks for overlap once per call and vectorizes both cases.
SFPO_ISA_CLONES void repos_main_only(float* main, const float* snap, float alpha, int64_t begin,
                                     int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    main[i] = reposition_value(main[i], snap[i], alpha);
  }
}

SFPO_ISA_CLONES void repos_float(float* main, const float* snap, float* out, float alpha,
                                 int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = reposition_value(main[i], snap[i], alpha);
    main[i] = v;
    out[i] = v;
  }
}

SFPO_ISA_CLONES void repos_bfloat16(float* main, const float* snap, uint16_t* out, float alpha,
                                    int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = reposition_value(main[i], snap[i], alpha);
    main[i] = v;
    out[i] = float_to_bfloat16_bits(v);
  }
}

SFPO_ISA_CLONES void repos_half(float* main, const float* snap, uint16_t* out, float alpha,
                                int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = reposition_value(main[i], snap[i], alpha);
    main[i] = v;
    out[i] = float_to_half_bits(v);
  }
}

}  // namespace

void reposition_cpu(float* main, const float* snap, void* model, ModelDtype dtype, float alpha,
                    int64_t begin, int64_t end) {
  switch (dtype) {
    case ModelDtype::kNone:
      repos_main_only(main, snap, alpha, begin, end);
      break;
    case ModelDtype::kFloat32:
      repos_float(main, snap, static_cast<float*>(model), alpha, begin, end);
      break;
    case ModelDtype::kBFloat16:
      repos_bfloat16(main, snap, static_cast<uint16_t*>(model), alpha, begin, end);
      break;
    case ModelDtype::kFloat16:
      repos_half(main, snap, static_cast<uint16_t*>(model), alpha, begin, end);
      break;
  }
}

}  // namespace sfpo
