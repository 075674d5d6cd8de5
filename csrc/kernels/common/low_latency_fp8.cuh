// FP8 (e4m3) per-token, per-128-channel cast used by the low-latency dispatch. The exact math is
// specified in ep_comm/fp8.py (the reference backend runs it); every step here is the same
// IEEE-754 operation with round-to-nearest-even, so the bits match:
//   amax  = max |x| over 128 channels (float32, exact), clamped below at 1e-4f
//   scale = amax / 448 (correctly rounded division, never a reciprocal multiply)
//   round_scale: scale = 2^ceil(log2(scale)), from the exponent bits
//   q     = e4m3_rn_satfinite(x / scale)
// Do not build this file with --use_fast_math: it would turn the divisions approximate.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace ep_comm {
namespace low_latency {

constexpr float kFp8E4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;  // the float32 nearest 1e-4, as torch's clamp(min=1e-4) uses

// 2^ceil(log2(s)) for a positive normal float32: bump the exponent when any mantissa bit is set.
__device__ __forceinline__ float round_up_to_pow2(float scale) {
  uint32_t bits = __float_as_uint(scale);
  uint32_t exponent = (bits >> 23) & 0xffu;
  if ((bits & 0x7fffffu) != 0) exponent += 1;
  return __uint_as_float(exponent << 23);
}

// UE8M0 byte of a power-of-two float32 scale: its biased exponent.
__device__ __forceinline__ uint32_t ue8m0_byte(float scale) {
  return (__float_as_uint(scale) >> 23) & 0xffu;
}

// Bit casts through memcpy (reading an int4 through a __nv_bfloat162* breaks strict aliasing;
// nvcc turns the copies into register moves).
__device__ __forceinline__ void bf16x8_to_float(const int4& raw, float (&v)[8]) {
  __nv_bfloat162 pairs[4];
  memcpy(pairs, &raw, sizeof(pairs));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ int4 float8_to_bf16x8(const float (&v)[8]) {
  __nv_bfloat162 pairs[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  int4 raw;
  memcpy(&raw, pairs, sizeof(raw));
  return raw;
}

// Quantize one token row with a full warp: x_row bf16 [hidden] (hidden % 128 == 0, read-only
// input) -> fp8_out [hidden] bytes and scales_out float32 [hidden / 128]. Lane l of a pass owns 8
// consecutive channels (one 16-byte load); the 16 lanes of a half-warp cover one 128-channel
// block, so the block amax is a 4-step butterfly inside the half-warp. All lanes run every pass
// (lanes past the end contribute zeros) so the full-warp shuffles stay converged.
__device__ __forceinline__ void cast_row_to_fp8(const int4* x_row, uint8_t* fp8_out, float* scales_out,
                                                int hidden, bool round_scale, int lane) {
  const int num_chunks = hidden / 8;
  for (int base = 0; base < num_chunks; base += 32) {
    const int chunk = base + lane;
    const bool valid = chunk < num_chunks;
    int4 raw = make_int4(0, 0, 0, 0);
    if (valid) raw = __ldg(x_row + chunk);
    float v[8];
    bf16x8_to_float(raw, v);
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1)
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    amax = fmaxf(amax, kAmaxFloor);
    float scale = __fdiv_rn(amax, kFp8E4m3Max);
    if (round_scale) scale = round_up_to_pow2(scale);
    if (valid) {
      uint32_t packed[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
            make_float2(__fdiv_rn(v[4 * i], scale), __fdiv_rn(v[4 * i + 1], scale)), __NV_SATFINITE, __NV_E4M3);
        const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
            make_float2(__fdiv_rn(v[4 * i + 2], scale), __fdiv_rn(v[4 * i + 3], scale)), __NV_SATFINITE,
            __NV_E4M3);
        packed[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
      *reinterpret_cast<uint2*>(fp8_out + chunk * 8) = make_uint2(packed[0], packed[1]);
      if ((lane & 15) == 0) scales_out[chunk / 16] = scale;
    }
  }
}

}  // namespace low_latency
}  // namespace ep_comm
