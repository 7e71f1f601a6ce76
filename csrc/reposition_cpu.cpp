// CPU reposition kernel (plain C++17, no torch dependency).
//
// Must be compiled with -ffp-contract=off: GCC's default for C++ is -ffp-contract=fast, which
// may fuse `alpha * d + snap` into one FMA (e.g. under -march=native), rounding once instead of
// twice and breaking bit-identity with torch's separately rounded sub_/mul_/add_.
#include <cstring>

#include "reposition.h"

namespace sfpo {
namespace {

// torch's AVX2/AVX512 float->bf16 kernels (ATen/cpu/vec/vec{256,512}/*bfloat16*.h) write 0xFFFF
// for every NaN; matching them keeps `.to(torch.bfloat16)` bit-identical on x86 CPUs.
constexpr uint16_t kBFloat16NaN = 0xFFFF;

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// The three separately rounded fp32 steps documented in reposition.h.
inline float reposition_value(float main, float snap, float alpha) {
  const float d = main - snap;
  const float t = alpha * d;
  return t + snap;
}

// Round-to-nearest-even truncation of the low 16 bits; overflow rounds into the inf encoding.
inline uint16_t float_to_bfloat16_bits(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return kBFloat16NaN;
  }
  const uint32_t bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + bias) >> 16);
}

// IEEE binary16 with round-to-nearest-even, overflow to inf and gradual underflow. NaNs stay quiet
// NaNs keeping sign and the top payload bits, as the F16C instruction (and torch) does.
inline uint16_t float_to_half_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) {
    return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  }
  if (a >= 0x477FF000u) {  // >= 65520 (halfway past the max half 65504): rounds to inf.
    return static_cast<uint16_t>(sign | 0x7C00u);
  }
  if (a >= 0x38800000u) {  // >= 2^-14: normal half. Rebias exponent 127 -> 15 and round.
    const uint32_t m = a - 0x38000000u;
    return static_cast<uint16_t>(sign | ((m + 0xFFFu + ((m >> 13) & 1u)) >> 13));
  }
  const uint32_t exponent = a >> 23;
  if (exponent < 102) {  // < 2^-25: at most half the smallest subnormal, ties go to zero.
    return sign;
  }
  // Subnormal half: value / 2^-24 rounded to an integer; a carry into 0x400 is the smallest normal.
  const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14..24
  const uint32_t rem = mantissa & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  uint32_t q = mantissa >> shift;
  if (rem > halfway || (rem == halfway && (q & 1u))) {
    ++q;
  }
  return static_cast<uint16_t>(sign | q);
}

template <typename Store>
void reposition_range(float* main, const float* snap, float alpha, int64_t begin, int64_t end,
                      Store store) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = reposition_value(main[i], snap[i], alpha);
    main[i] = v;
    store(i, v);
  }
}

}  // namespace

void reposition_cpu(float* main, const float* snap, void* model, ModelDtype dtype, float alpha,
                    int64_t begin, int64_t end) {
  switch (dtype) {
    case ModelDtype::kNone:
      reposition_range(main, snap, alpha, begin, end, [](int64_t, float) {});
      break;
    case ModelDtype::kFloat32: {
      float* out = static_cast<float*>(model);
      reposition_range(main, snap, alpha, begin, end, [out](int64_t i, float v) { out[i] = v; });
      break;
    }
    case ModelDtype::kBFloat16: {
      uint16_t* out = static_cast<uint16_t*>(model);
      reposition_range(main, snap, alpha, begin, end,
                       [out](int64_t i, float v) { out[i] = float_to_bfloat16_bits(v); });
      break;
    }
    case ModelDtype::kFloat16: {
      uint16_t* out = static_cast<uint16_t*>(model);
      reposition_range(main, snap, alpha, begin, end,
                       [out](int64_t i, float v) { out[i] = float_to_half_bits(v); });
      break;
    }
  }
}

}  // namespace sfpo
