"""FP8 (e4m3) per-token, per-128-channel quantization: the exact math the kernels mirror.

This module is the specification of ep_comm's FP8 format. The reference backend calls it, and the
CUDA kernels (csrc/kernels/common/fp8.cuh) must produce the same bits. Every step below is one
IEEE-754 operation with round-to-nearest-even, so a kernel reproduces it exactly when it uses the
same operations in the same order.

Quantization of one token row `x` (bf16 or float32, `hidden` channels, `hidden % 128 == 0`), for
each block `b` of 128 consecutive channels:

    amax[b]  = max(|x[c]| for c in block b), in float32            (exact: abs and max do not round)
    amax[b]  = max(amax[b], 1e-4f)                                  (the float32 nearest 1e-4)
    scale[b] = amax[b] / 448.0f                                     (float32 division, correctly rounded)
    if round_scale:
        scale[b] = 2 ** ceil(log2(scale[b]))                        (exact, on the bits: see round_up_to_pow2)
    q[c]     = float(x[c]) / scale[b]                               (float32 division, correctly rounded)
    x_fp8[c] = e4m3(q[c])                                           (round to nearest, ties to even)

Kernel notes:
  * Divide, do not multiply by a reciprocal: `__fdiv_rn(amax, 448.0f)` and `__fdiv_rn(x, scale)`
    (plain `/` is the same unless the file is built with --use_fast_math / -prec-div=false).
    `amax * (1.0f / 448.0f)` differs in about half of all cases, and would turn an exact power of
    two such as 448 * 2**k / 448 into 2**k * (1 + eps), which round_scale would then double. With
    round_scale the scale is a power of two, so the division is exact and equals multiplying by
    2**-k; kernels may multiply there, and only there.
  * e4m3 conversion: `__nv_cvt_float2_to_fp8x2(..., __NV_SATFINITE, __NV_E4M3)` (or the
    `__nv_fp8x2_e4m3` constructor, which saturates). Saturation never matters: `scale >= amax / 448`
    up to one float32 rounding, so `|q| <= 448 * (1 + 2**-23)`, which rounds to 448 whether or not
    the conversion saturates (the next e4m3 step would be 480; the midpoint is 464). torch's CPU cast
    saturates too.
  * Flush-to-zero is harmless: a float32 subnormal input or quotient rounds to e4m3 zero anyway, and a
    subnormal amax is clamped to 1e-4.
  * Non-finite inputs (inf, NaN) are outside the contract; results for them are unspecified.

Scale formats:
  * float32 `[..., hidden / 128]`: `scale[b]` itself (x ≈ x_fp8 * scale).
  * UE8M0 (`use_ue8m0=True`, requires `round_scale=True` and `hidden % 512 == 0`): each power-of-two
    scale is stored as one byte, its float32 biased exponent (bits 23..30; scale = 2 ** (byte - 127)),
    and four bytes are packed into one int32, little-endian: block `4*j + i` is byte `i` (bits
    `8*i .. 8*i+7`) of word `j`. Shape int32 `[..., hidden / 512]`.

Dequantization (`per_token_cast_back`): `bf16(float(x_fp8[c]) * scale[b])`, one float32 multiply
(correctly rounded) then one round-to-nearest-even to bf16. Kernels must round twice in that order.

Low-latency outputs are 3-D `[E_local, R*T, hidden]`; their scales use DeepEP's column-major layout
(allocated `[E_local, S, R*T]`, returned transposed), see `column_major_scales` and
`empty_column_major_scales`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "FP8_BLOCK_SIZE",
    "UE8M0_SCALES_PER_INT32",
    "AMAX_FLOOR",
    "per_token_cast_to_fp8",
    "per_token_cast_back",
    "round_up_to_pow2",
    "pack_ue8m0",
    "unpack_ue8m0",
    "column_major_scales",
    "empty_column_major_scales",
]

FP8_E4M3_MAX = 448.0            # largest finite float8_e4m3fn value
FP8_BLOCK_SIZE = 128            # channels sharing one scale
UE8M0_SCALES_PER_INT32 = 4      # UE8M0 bytes packed into one int32
AMAX_FLOOR = 1e-4               # amax is clamped below at float32(1e-4), so all-zero blocks get a finite scale

_INPUT_DTYPES = (torch.bfloat16, torch.float32)
_FLOAT32_EXPONENT_SHIFT = 23
_FLOAT32_MANTISSA_MASK = (1 << 23) - 1
_UE8M0_BYTE_SHIFTS = (0, 8, 16, 24)   # block 4*j + i lives in byte i of word j (little-endian)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_is_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_rank_2_or_3(name: str, t: torch.Tensor, layout: str) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D [num_tokens, {layout}] or 3-D [num_experts, num_tokens, {layout}], "
                         f"got shape {tuple(t.shape)}")


def _check_hidden_multiple(name: str, hidden: int, multiple: int, why: str) -> None:
    if hidden <= 0 or hidden % multiple != 0:
        raise ValueError(f"{name}: hidden must be a positive multiple of {multiple} ({why}), got {hidden}")


def _check_quantize_input(x: torch.Tensor) -> None:
    _check_is_tensor("x", x)
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16 or float32, got {x.dtype}")
    _check_rank_2_or_3("x", x, "hidden")
    _check_hidden_multiple("x", x.shape[-1], FP8_BLOCK_SIZE, "one scale per 128 channels")


def _check_power_of_two_scales(scales: torch.Tensor) -> None:
    """Every value must be a positive, normal float32 power of two (what round_scale produces)."""
    bits = scales.view(torch.int32)
    exponent = (bits >> _FLOAT32_EXPONENT_SHIFT) & 0xFF
    ok = (bits >= 0) & ((bits & _FLOAT32_MANTISSA_MASK) == 0) & (exponent > 0) & (exponent < 255)
    if not bool(ok.all()):
        bad = scales[~ok].flatten()[0].item()
        raise ValueError("UE8M0 packing needs positive normal float32 powers of two (quantize with "
                         f"round_scale=True), but a scale is {bad!r}")


# ---------------------------------------------------------------------------------------------
# Scale helpers
# ---------------------------------------------------------------------------------------------

def round_up_to_pow2(scales: torch.Tensor) -> torch.Tensor:
    """Round positive normal float32 scales up to a power of two, exactly: 2 ** ceil(log2(s)).

    scales: float32, any shape, every value a positive normal float32 (amax/448 always is).
    Works on the bits, as the kernels do: the exponent field plus one when any mantissa bit is set.
    A power of two stays itself; the result r satisfies s <= r < 2 * s.
    """
    _check_is_tensor("scales", scales)
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    bits = scales.view(torch.int32)
    exponent = (bits >> _FLOAT32_EXPONENT_SHIFT) & 0xFF
    has_mantissa = (bits & _FLOAT32_MANTISSA_MASK) != 0
    ok = (bits >= 0) & (exponent > 0) & ((exponent < 254) | ((exponent == 254) & ~has_mantissa))
    if not bool(ok.all()):
        bad = scales[~ok].flatten()[0].item()
        raise ValueError(f"round_up_to_pow2 needs positive normal float32 scales at most 2**127, got {bad!r}")
    exponent = exponent + has_mantissa.to(torch.int32)
    return (exponent << _FLOAT32_EXPONENT_SHIFT).view(torch.float32)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales `[..., S]` into UE8M0 int32 `[..., S / 4]`.

    Byte i of word j (bits 8*i .. 8*i+7, little-endian) holds the float32 biased exponent of
    scale 4*j + i. Raises ValueError unless S % 4 == 0 and every scale is a positive normal power
    of two. The result is contiguous.
    """
    _check_is_tensor("scales", scales)
    if scales.dtype != torch.float32:
        raise TypeError(f"pack_ue8m0 takes float32 scales, got {scales.dtype}")
    if scales.dim() == 0 or scales.shape[-1] % UE8M0_SCALES_PER_INT32 != 0:
        raise ValueError(f"pack_ue8m0: the last dim of scales must be a multiple of {UE8M0_SCALES_PER_INT32}, "
                         f"got shape {tuple(scales.shape)}")
    _check_power_of_two_scales(scales)
    exponent = ((scales.view(torch.int32) >> _FLOAT32_EXPONENT_SHIFT) & 0xFF).to(torch.int64)
    exponent = exponent.reshape(*scales.shape[:-1], scales.shape[-1] // UE8M0_SCALES_PER_INT32,
                                UE8M0_SCALES_PER_INT32)
    shifts = torch.tensor(_UE8M0_BYTE_SHIFTS, dtype=torch.int64, device=scales.device)
    word = (exponent << shifts).sum(dim=-1)                  # in [0, 2**32): reinterpret as int32
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)
    return word.to(torch.int32).contiguous()


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Unpack UE8M0 int32 `[..., W]` into float32 scales `[..., 4 * W]`, exactly.

    Byte b becomes 2 ** (b - 127) (byte 0 is the float32 subnormal 2**-127), and byte 255 becomes
    NaN, as in the OCP MX E8M0 format. Scales written by ep_comm only use bytes 1..254.
    """
    _check_is_tensor("packed", packed)
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_ue8m0 takes int32 packed scales, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_ue8m0 needs at least 1-D packed scales, got a 0-D tensor")
    shifts = torch.tensor(_UE8M0_BYTE_SHIFTS, dtype=torch.int64, device=packed.device)
    byte = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF          # [..., W, 4]
    bits = byte << _FLOAT32_EXPONENT_SHIFT
    bits = torch.where(byte == 0, torch.full_like(bits, 1 << 22), bits)     # 2**-127, subnormal
    bits = torch.where(byte == 255, torch.full_like(bits, 0x7FC00000), bits)  # NaN
    bits = bits.to(torch.int32).reshape(*packed.shape[:-1], packed.shape[-1] * UE8M0_SCALES_PER_INT32)
    return bits.view(torch.float32)


def column_major_scales(scales: torch.Tensor) -> torch.Tensor:
    """The same values as `scales` `[..., T, S]`, stored column-major: allocated `[..., S, T]` and
    returned transposed, so `stride(-2) == 1` (DeepEP's layout; DeepGEMM's TMA loads expect it).

    Equal to `scales.transpose(-1, -2).contiguous().transpose(-1, -2)`. Any dtype (float32 or
    packed int32 UE8M0), at least 2-D.
    """
    _check_is_tensor("scales", scales)
    if scales.dim() < 2:
        raise ValueError(f"column_major_scales needs at least 2-D scales [..., T, S], got shape {tuple(scales.shape)}")
    return scales.transpose(-1, -2).contiguous().transpose(-1, -2)


def empty_column_major_scales(num_experts: int, num_tokens: int, num_scales: int,
                              dtype: torch.dtype = torch.float32,
                              device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """Uninitialized scales shaped `[num_experts, num_tokens, num_scales]`, allocated
    `[num_experts, num_scales, num_tokens]` and returned as its transposed view (stride(-2) == 1).

    num_scales is hidden / 128 for float32 scales, hidden / 512 for packed UE8M0 (dtype int32).
    """
    for name, value in (("num_experts", num_experts), ("num_tokens", num_tokens), ("num_scales", num_scales)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"empty_column_major_scales: {name} must be a non-negative int, got {value!r}")
    if dtype not in (torch.float32, torch.int32):
        raise TypeError(f"empty_column_major_scales: dtype must be float32 or int32 (UE8M0), got {dtype}")
    return torch.empty(num_experts, num_scales, num_tokens, dtype=dtype, device=device).transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------

def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False,
                          use_ue8m0: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize per token, per 128-channel block, to float8_e4m3fn (formula in the module docstring).

    x: bf16 or float32 `[N, H]` or `[E, T, H]` (leading dims are tokens), H % 128 == 0.
    round_scale: round each scale up to a power of two (exactly; see round_up_to_pow2).
    use_ue8m0: return the scales packed as UE8M0 int32; needs round_scale=True and H % 512 == 0.

    Returns `(x_fp8, scales)`: x_fp8 float8_e4m3fn with x's shape; scales float32 `[..., H / 128]`
    (scale = amax / 448, so x ≈ x_fp8 * scale), or int32 `[..., H / 512]` with use_ue8m0.
    Both are contiguous (row-major); see column_major_scales for the low-latency layout.
    """
    _check_quantize_input(x)
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True: UE8M0 can only hold power-of-two scales")
    if use_ue8m0:
        _check_hidden_multiple("x", x.shape[-1], FP8_BLOCK_SIZE * UE8M0_SCALES_PER_INT32,
                               "UE8M0 packs 4 scales of 128 channels into one int32")
    hidden = x.shape[-1]
    num_blocks = hidden // FP8_BLOCK_SIZE
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], num_blocks, FP8_BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    # Divide by a full tensor, not a Python scalar: torch's CUDA kernel turns `t / scalar` into
    # `t * (1 / scalar)`, which is not the correctly rounded division the kernels do.
    scales = amax / torch.full_like(amax, FP8_E4M3_MAX)
    if round_scale:
        scales = round_up_to_pow2(scales)
    x_fp8 = (blocks / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(x.shape)
    if use_ue8m0:
        scales = pack_ue8m0(scales)
    return x_fp8, scales.contiguous()


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize: `bf16(float32(x_fp8) * scale)` per 128-channel block.

    x_fp8: float8_e4m3fn `[N, H]` or `[E, T, H]`.
    scales: float32 `[..., H / 128]`, or packed UE8M0 int32 `[..., H / 512]`, with the same leading
    dims as x_fp8; any strides (the column-major low-latency layout is fine).
    Returns bf16 with x_fp8's shape.
    """
    _check_is_tensor("x_fp8", x_fp8)
    _check_is_tensor("scales", scales)
    if x_fp8.dtype != torch.float8_e4m3fn:
        raise TypeError(f"x_fp8 must be float8_e4m3fn, got {x_fp8.dtype}")
    _check_rank_2_or_3("x_fp8", x_fp8, "hidden")
    hidden = x_fp8.shape[-1]
    _check_hidden_multiple("x_fp8", hidden, FP8_BLOCK_SIZE, "one scale per 128 channels")
    if scales.dtype == torch.float32:
        expected = (*x_fp8.shape[:-1], hidden // FP8_BLOCK_SIZE)
    elif scales.dtype == torch.int32:
        _check_hidden_multiple("x_fp8", hidden, FP8_BLOCK_SIZE * UE8M0_SCALES_PER_INT32,
                               "packed UE8M0 scales cover 512 channels per int32")
        expected = (*x_fp8.shape[:-1], hidden // (FP8_BLOCK_SIZE * UE8M0_SCALES_PER_INT32))
    else:
        raise TypeError(f"scales must be float32 or packed UE8M0 int32, got {scales.dtype}")
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales for x_fp8 of shape {tuple(x_fp8.shape)} must have shape {expected} "
                         f"({scales.dtype}), got {tuple(scales.shape)}")
    if scales.device != x_fp8.device:
        raise ValueError(f"scales are on {scales.device} but x_fp8 is on {x_fp8.device}")
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    blocks = x_fp8.to(torch.float32).reshape(*x_fp8.shape[:-1], hidden // FP8_BLOCK_SIZE, FP8_BLOCK_SIZE)
    return (blocks * scales.unsqueeze(-1)).reshape(x_fp8.shape).to(torch.bfloat16)
