// bfloat16 for the emulated device: the subset of CUDA's cuda_bf16.h the kernels use, bit-exact
// with the GPU (round to nearest even; NaN stays NaN).
#pragma once

#include <cstdint>
#include <cstring>

#include "ep_emu/device.hpp"

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f);
  operator float() const {
    const uint32_t bits = uint32_t(__x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline uint16_t ep_emu_float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}
inline __nv_bfloat16::__nv_bfloat16(float f) : __x(ep_emu_float_to_bf16_bits(f)) {}

inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{float(h.x), float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) {
  __nv_bfloat16 h;
  h.__x = x;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
