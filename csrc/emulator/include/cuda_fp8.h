// FP8 for the emulated device: the float -> e4m3 conversion the low-latency cast uses, bit-exact
// with CUDA's __nv_cvt_float2_to_fp8x2(..., __NV_SATFINITE, __NV_E4M3) (round to nearest even;
// finite values beyond 448 saturate to 448; NaN stays NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "ep_emu/device.hpp"

using __nv_fp8_storage_t = unsigned char;
using __nv_fp8x2_storage_t = unsigned short;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

inline __nv_fp8_storage_t ep_emu_float_to_e4m3(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<__nv_fp8_storage_t>(sign | 0x7f);
  if (a > 448.0f) return static_cast<__nv_fp8_storage_t>(sign | 0x7e);  // saturate (also infinities)
  if (a < 0.015625f) {
    // Subnormal range: multiples of 2^-9 (exact scaling; nearbyint rounds to nearest even).
    const int q = static_cast<int>(std::nearbyint(std::ldexp(a, 9)));  // 0..8; 8 is the smallest normal
    return static_cast<__nv_fp8_storage_t>(sign | q);
  }
  int exponent = 0;
  std::frexp(a, &exponent);  // a = m * 2^exponent, m in [0.5, 1)
  exponent -= 1;             // a = 1.x * 2^exponent
  int mantissa = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - exponent)));  // 8..16
  if (mantissa == 16) {
    mantissa = 8;
    exponent += 1;
  }
  const int code = ((exponent + 7) << 3) | (mantissa - 8);
  if (code > 0x7e) return static_cast<__nv_fp8_storage_t>(sign | 0x7e);
  return static_cast<__nv_fp8_storage_t>(sign | code);
}

inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 v, __nv_saturation_t saturate,
                                                      __nv_fp8_interpretation_t kind) {
  (void)saturate;  // only the e4m3 saturating conversion is emulated
  (void)kind;
  return static_cast<__nv_fp8x2_storage_t>(ep_emu_float_to_e4m3(v.x) |
                                           (static_cast<unsigned>(ep_emu_float_to_e4m3(v.y)) << 8));
}
