"""ep_comm.fp8: the quantization formula, its error bound, scale rounding, UE8M0 packing, layouts.

References here are built from first principles (float64 arithmetic and an explicit e4m3 grid), not
by calling the code under test again, so they also pin down what the CUDA kernels must produce.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from ep_comm.fp8 import (AMAX_FLOOR, FP8_E4M3_MAX, column_major_scales, empty_column_major_scales,
                         pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, round_up_to_pow2,
                         unpack_ue8m0)

SEEDS = [0, 1, 2]
DTYPES = [torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------------
# Inputs and first-principles references
# ---------------------------------------------------------------------------------------------

def make_input(seed: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Random tokens whose 128-channel blocks span many magnitudes, plus special blocks:
    all zeros (the 1e-4 clamp), tiny (amax below the clamp), huge, amax = 448 * 2**k exactly,
    and a single non-zero channel."""
    g = torch.Generator().manual_seed(seed)
    *lead, hidden = shape
    num_blocks = hidden // 128
    x = torch.randn(*lead, num_blocks, 128, generator=g, dtype=torch.float64)
    exponent = torch.empty(*lead, num_blocks, 1, dtype=torch.float64).uniform_(-6, 6, generator=g)
    x = x * torch.pow(10.0, exponent)
    flat = x.reshape(-1, num_blocks, 128)
    if flat.shape[0] >= 1 and num_blocks >= 6:
        huge = 1e30 if dtype == torch.bfloat16 else 1e38
        flat[0, 0] = 0.0                                       # all-zero block
        flat[0, 1] *= 1e-6 / flat[0, 1].abs().max()            # amax 1e-6 < 1e-4: clamped
        flat[0, 2] *= huge / flat[0, 2].abs().max()            # near the top of the range
        flat[0, 3] = torch.linspace(-1, 1, 128, dtype=torch.float64) * (448.0 * 2.0 ** -5)  # scale exactly 2**-5
        flat[0, 4] = 0.0
        flat[0, 4, 17] = -3.0                                  # one non-zero channel
        flat[0, 5] *= 1e-30 / flat[0, 5].abs().max()           # far below the clamp
    assert bool((x != 0).any())
    return x.reshape(shape).to(dtype)


def block_amax64(x: torch.Tensor) -> torch.Tensor:
    return x.double().reshape(*x.shape[:-1], -1, 128).abs().amax(dim=-1)


def reference_scales(x: torch.Tensor, round_scale: bool) -> torch.Tensor:
    """float32(max(amax, float32(1e-4)) / 448), division rounded once (float64 then float32 is
    innocuous double rounding for a quotient of two float32s), then 2**ceil(log2) via math.frexp."""
    floor = float(torch.tensor(AMAX_FLOOR, dtype=torch.float32))
    amax = block_amax64(x).clamp(min=floor)
    scales = (amax / FP8_E4M3_MAX).float()
    if round_scale:
        def ceil_pow2(s: float) -> float:
            mantissa, exp = math.frexp(s)                      # s = mantissa * 2**exp, 0.5 <= mantissa < 1
            return math.ldexp(1.0, exp - 1) if mantissa == 0.5 else math.ldexp(1.0, exp)
        scales = torch.tensor([ceil_pow2(s) for s in scales.flatten().tolist()],
                              dtype=torch.float32).reshape(scales.shape)
    return scales


def e4m3_grid() -> torch.Tensor:
    """All non-negative finite float8_e4m3fn values, ascending; index == bit code (0x00..0x7E)."""
    return torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()


def reference_e4m3_rne(q: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest e4m3 value, ties to the even code, saturating at 448."""
    grid = e4m3_grid()
    a = q.double().abs().flatten()
    idx = torch.searchsorted(grid, a).clamp(1, 126)
    lo, hi = grid[idx - 1], grid[idx]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (idx % 2 == 0))
    out = torch.where(pick_hi, hi, lo)
    return torch.copysign(out, q.double().flatten()).reshape(q.shape)


def expand_scales(scales: torch.Tensor) -> torch.Tensor:
    return scales.double().repeat_interleave(128, dim=-1)


# ---------------------------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------------------------

def test_torch_e4m3_cast_is_round_to_nearest_even():
    """The cast we rely on (and kernels mirror with __NV_SATFINITE) is RNE on the e4m3 grid,
    ties included; values between 448 and 464 round to 448."""
    grid = e4m3_grid()
    midpoints = (grid[:-1] + grid[1:]) / 2                     # exact ties, representable in float32
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(200_000, generator=g, dtype=torch.float64) * 2 - 1) * 464
    small = (torch.rand(50_000, generator=g, dtype=torch.float64) * 2 - 1) * 2.0 ** -5
    q = torch.cat([grid, -grid, midpoints, -midpoints, rand, small,
                   torch.tensor([448.0 * (1 + 2.0 ** -23), 460.0, -463.9])]).float()
    got = q.to(torch.float8_e4m3fn).double()
    assert torch.equal(got, reference_e4m3_rne(q))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("round_scale", [False, True])
def test_quantization_matches_formula(seed, dtype, round_scale):
    x = make_input(seed, (33, 1024), dtype)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (33, 8) and scales.is_contiguous()
    # scale = amax / 448 exactly (correctly rounded float32), or its power-of-two round-up.
    assert torch.equal(scales, reference_scales(x, round_scale))
    # x_fp8 = e4m3_rne(float32(x / scale)).
    q = (x.double() / expand_scales(scales)).float()
    assert q.abs().max() <= FP8_E4M3_MAX * (1 + 2.0 ** -23)
    assert torch.equal(x_fp8.double(), reference_e4m3_rne(q))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("round_scale", [False, True])
def test_round_trip_error_bound(seed, dtype, round_scale):
    """y = bf16(float32(e4m3(x / s)) * s). e4m3 has 4 significant bits: rounding q = x/s costs at most
    half an ulp, 2**-4 * |q| for normal q (|q| >= 2**-6) and half the subnormal step 2**-10 below.
    The bf16 rounding of the product costs at most 2**-8 of it (<= 2**-8 * |y| * (1 + 2**-7)), and
    the two float32 roundings (x/s and e4m3 * s, 2**-24 each) are covered by 2**-20 * (|x| + s):

        |x - y| <= max(2**-4 * |x|, 2**-10 * s) + 2**-8 * (1 + 2**-7) * |y| + 2**-20 * (|x| + s)
    """
    x = make_input(seed, (64, 1024), dtype)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    y = per_token_cast_back(x_fp8, scales)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.isfinite(y).all()
    x64, y64, s64 = x.double(), y.double(), expand_scales(scales)
    bound = (torch.maximum(2.0 ** -4 * x64.abs(), 2.0 ** -10 * s64) + 2.0 ** -8 * (1 + 2.0 ** -7) * y64.abs()
             + 2.0 ** -20 * (x64.abs() + s64))
    err = (x64 - y64).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"seed={seed}: error exceeds the bound by {worst:.6f}x"
    assert worst > 0.5, f"seed={seed}: the bound is loose (worst ratio {worst:.3f})"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("round_scale", [False, True])
def test_cast_back_matches_formula(seed, round_scale):
    """y = bf16(float32(x_fp8 * scale)): the float64 product is exact (4 + 24 significant bits)."""
    x = make_input(seed, (16, 512), torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    expected = (x_fp8.double() * expand_scales(scales)).float().bfloat16()
    assert torch.equal(per_token_cast_back(x_fp8, scales), expected)


def test_special_blocks():
    x = make_input(0, (2, 768), torch.float32)
    x_fp8, scales = per_token_cast_to_fp8(x)
    floor_scale = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / torch.tensor(FP8_E4M3_MAX)
    # all-zero and far-below-the-clamp blocks get scale float32(1e-4) / 448 and quantize to zero
    assert scales[0, 0] == floor_scale and scales[0, 1] == floor_scale and scales[0, 5] == floor_scale
    assert (x_fp8[0, :128].float() == 0).all() and (x_fp8[0, 640:].float() == 0).all()
    assert (per_token_cast_back(x_fp8, scales)[0, :128].float() == 0).all()
    # amax = 448 * 2**-5: scale is 2**-5 exactly, with or without round_scale, and the max maps to 448
    assert scales[0, 3] == 2.0 ** -5
    assert per_token_cast_to_fp8(x, round_scale=True)[1][0, 3] == 2.0 ** -5
    assert x_fp8[0, 384:512].float().abs().max() == FP8_E4M3_MAX
    # one non-zero channel: it becomes -448 exactly and comes back exactly
    assert x_fp8[0, 512 + 17].float() == -FP8_E4M3_MAX
    assert per_token_cast_back(x_fp8, scales)[0, 512 + 17].float() == -3.0
    # every block's amax element maps to +-448 (unless the block was clamped)
    blocks = x_fp8.float().reshape(2, 6, 128).abs().amax(dim=-1)
    unclamped = block_amax64(x) >= AMAX_FLOOR
    assert (blocks[unclamped] == FP8_E4M3_MAX).all()


# ---------------------------------------------------------------------------------------------
# round_scale and UE8M0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_scale_is_next_power_of_two(seed, dtype):
    x = make_input(seed, (40, 1024), dtype)
    _, plain = per_token_cast_to_fp8(x)
    _, rounded = per_token_cast_to_fp8(x, round_scale=True)
    bits = rounded.view(torch.int32)
    assert ((bits & ((1 << 23) - 1)) == 0).all() and (bits > 0).all()
    assert (rounded >= plain).all() and (rounded < 2 * plain).all()
    pow2 = ((plain.view(torch.int32) & ((1 << 23) - 1)) == 0)
    assert pow2.any()                                           # the 448 * 2**-5 block
    assert torch.equal(rounded[pow2], plain[pow2])


def test_round_up_to_pow2_exact_on_powers_of_two():
    powers = torch.tensor([2.0 ** k for k in range(-126, 128)], dtype=torch.float32)
    assert torch.equal(round_up_to_pow2(powers), powers)
    above = torch.nextafter(powers[:-1], torch.tensor(float("inf")))
    assert torch.equal(round_up_to_pow2(above), powers[1:])
    below = torch.nextafter(powers[1:], torch.tensor(0.0))
    assert torch.equal(round_up_to_pow2(below), powers[1:])
    for bad in ([0.0], [-1.0], [1e-40], [float("inf")], [float("nan")], [2.0 ** 127 * 1.5]):
        with pytest.raises(ValueError):
            round_up_to_pow2(torch.tensor(bad, dtype=torch.float32))
    with pytest.raises(TypeError):
        round_up_to_pow2(torch.ones(4, dtype=torch.float64))


def test_ue8m0_byte_order():
    scales = torch.tensor([[2.0 ** -1, 2.0 ** 0, 2.0 ** 1, 2.0 ** 2, 2.0 ** -127 * 2, 2.0 ** 127, 1.0, 1.0]])
    packed = pack_ue8m0(scales)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    word0 = 126 | 127 << 8 | 128 << 16 | 129 << 24             # block 4j+i -> byte i of word j
    word1 = 1 | 254 << 8 | 127 << 16 | 127 << 24
    as_int32 = lambda w: w - (1 << 32) if w >= 1 << 31 else w
    assert packed.tolist() == [[as_int32(word0), as_int32(word1)]]
    if sys.byteorder == "little":                              # the same bytes in memory order
        assert packed.view(torch.uint8).tolist() == [[126, 127, 128, 129, 1, 254, 127, 127]]
    assert torch.equal(unpack_ue8m0(packed), scales)


def test_ue8m0_unpack_every_byte():
    byte = torch.arange(256, dtype=torch.int64)
    words = byte.reshape(64, 4) << torch.tensor([0, 8, 16, 24])
    words = words.sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    scales = unpack_ue8m0(words).flatten()
    assert scales.dtype == torch.float32 and scales.shape == (256,)
    expected = torch.tensor([2.0 ** (b - 127) for b in range(255)], dtype=torch.float64)
    assert torch.equal(scales[:255].double(), expected)
    assert torch.isnan(scales[255])
    # round trip: bytes 4..251 are words 1..62, all normal powers of two
    normal = scales[4:252].reshape(62, 4)
    assert torch.equal(pack_ue8m0(normal), words[1:63].reshape(62, 1))
    assert torch.equal(unpack_ue8m0(pack_ue8m0(normal)), normal)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(24, 2048), (3, 5, 1024)])
def test_use_ue8m0(seed, shape):
    x = make_input(seed, shape, torch.bfloat16)
    x_fp8_f, scales_f = per_token_cast_to_fp8(x, round_scale=True)
    x_fp8_u, packed = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert torch.equal(x_fp8_u.view(torch.uint8), x_fp8_f.view(torch.uint8))
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 512)
    assert torch.equal(packed, pack_ue8m0(scales_f))
    assert torch.equal(unpack_ue8m0(packed), scales_f)
    exponents = ((scales_f.view(torch.int32) >> 23) & 0xFF).reshape(*shape[:-1], -1, 4)
    for i in range(4):
        assert torch.equal((packed >> (8 * i)) & 0xFF, exponents[..., i])
    assert torch.equal(per_token_cast_back(x_fp8_u, packed), per_token_cast_back(x_fp8_f, scales_f))


# ---------------------------------------------------------------------------------------------
# Shapes and layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_3d_input_treats_leading_dims_as_tokens(round_scale, use_ue8m0):
    x = make_input(3, (4, 6, 1024), torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    flat_fp8, flat_scales = per_token_cast_to_fp8(x.reshape(24, 1024), round_scale=round_scale,
                                                  use_ue8m0=use_ue8m0)
    assert x_fp8.shape == (4, 6, 1024) and scales.shape == (4, 6, 2 if use_ue8m0 else 8)
    assert torch.equal(x_fp8.reshape(24, 1024).view(torch.uint8), flat_fp8.view(torch.uint8))
    assert torch.equal(scales.reshape(24, -1), flat_scales)
    assert torch.equal(per_token_cast_back(x_fp8, scales).reshape(24, 1024),
                       per_token_cast_back(flat_fp8, flat_scales))


def test_non_contiguous_input_and_empty():
    x = make_input(4, (40, 256), torch.float32).t().contiguous().t()   # [40, 256], column-major
    assert not x.is_contiguous()
    a, sa = per_token_cast_to_fp8(x)
    b, sb = per_token_cast_to_fp8(x.contiguous())
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)
    empty_fp8, empty_scales = per_token_cast_to_fp8(torch.zeros(0, 512, dtype=torch.bfloat16),
                                                    round_scale=True, use_ue8m0=True)
    assert empty_fp8.shape == (0, 512) and empty_scales.shape == (0, 1)
    assert per_token_cast_back(empty_fp8, empty_scales).shape == (0, 512)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_column_major_scales(dtype):
    x = make_input(5, (3, 7, 2048), torch.bfloat16)
    use_ue8m0 = dtype == torch.int32
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
    cm = column_major_scales(scales)
    assert cm.shape == scales.shape and cm.dtype == dtype and torch.equal(cm, scales)
    assert cm.stride(-2) == 1 and cm.stride(-1) == 7
    assert torch.equal(cm, scales.transpose(-1, -2).contiguous().transpose(-1, -2))
    assert torch.equal(per_token_cast_back(x_fp8, cm), per_token_cast_back(x_fp8, scales))

    S = scales.shape[-1]
    e = empty_column_major_scales(3, 7, S, dtype=dtype, device="cpu")
    assert e.shape == (3, 7, S) and e.dtype == dtype
    assert e.stride() == (S * 7, 1, 7)
    e.copy_(scales)
    assert torch.equal(e, scales) and e.stride(-2) == 1


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    good = torch.randn(4, 512, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        per_token_cast_to_fp8([[1.0] * 128])
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        per_token_cast_to_fp8(good.half())
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        per_token_cast_to_fp8(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 128"):
        per_token_cast_to_fp8(torch.randn(4, 100))
    with pytest.raises(ValueError, match="multiple of 128"):
        per_token_cast_to_fp8(torch.randn(4, 0))
    with pytest.raises(ValueError, match="2-D"):
        per_token_cast_to_fp8(torch.randn(128))
    with pytest.raises(ValueError, match="2-D"):
        per_token_cast_to_fp8(torch.randn(2, 2, 2, 128))
    with pytest.raises(ValueError, match="round_scale"):
        per_token_cast_to_fp8(good, use_ue8m0=True)
    with pytest.raises(ValueError, match="multiple of 512"):
        per_token_cast_to_fp8(torch.randn(4, 384), round_scale=True, use_ue8m0=True)

    x_fp8, scales = per_token_cast_to_fp8(good)
    _, packed = per_token_cast_to_fp8(good, round_scale=True, use_ue8m0=True)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        per_token_cast_back(good, scales)
    with pytest.raises(TypeError, match="float32 or packed UE8M0 int32"):
        per_token_cast_back(x_fp8, scales.double())
    with pytest.raises(ValueError, match="must have shape"):
        per_token_cast_back(x_fp8, scales[:, :2])
    with pytest.raises(ValueError, match="must have shape"):
        per_token_cast_back(x_fp8, scales[:3])
    with pytest.raises(ValueError, match="must have shape"):
        per_token_cast_back(x_fp8, packed.repeat(1, 2))
    with pytest.raises(ValueError, match="multiple of 512"):
        per_token_cast_back(x_fp8[:, :384], packed)

    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ue8m0(torch.ones(4, 6))
    with pytest.raises(ValueError, match="powers of two"):
        pack_ue8m0(torch.full((2, 4), 3.0))
    with pytest.raises(ValueError, match="powers of two"):
        pack_ue8m0(torch.full((2, 4), -2.0))
    with pytest.raises(ValueError, match="powers of two"):
        pack_ue8m0(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="float32"):
        pack_ue8m0(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="int32"):
        unpack_ue8m0(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        column_major_scales(torch.ones(4))
    with pytest.raises(ValueError, match="non-negative int"):
        empty_column_major_scales(2, -1, 4)
    with pytest.raises(TypeError, match="float32 or int32"):
        empty_column_major_scales(2, 3, 4, dtype=torch.bfloat16)
