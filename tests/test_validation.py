"""Input checks of ep_comm/validation.py that need no ranks: what the kernels' memory accesses demand."""
from __future__ import annotations

import pytest
import torch

from ep_comm import validation as v


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` that starts one element past the start of its (aligned) storage,
    as `big[1:].view(...)` does: contiguous() returns it unchanged, address and all."""
    storage = torch.zeros(t.numel() + 1, dtype=t.dtype)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.contiguous().data_ptr() == view.data_ptr()
    return view


def test_misaligned_contiguous_view_is_refused_with_its_name_and_offset():
    x = misaligned(torch.randn(4, 256).bfloat16())
    with pytest.raises(ValueError, match=r"x must start on a 16-byte boundary.*address mod 16 = 2"):
        v.check_base_alignment("x", x)
    with pytest.raises(ValueError, match=r"address mod 16 = 2"):
        v.split_x(x)
    fp8 = misaligned(torch.randn(4, 256).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"x\[0\] must start.*address mod 16 = 1"):
        v.split_x((fp8, torch.ones(4, 2)))
    with pytest.raises(ValueError, match=r"bias\[1\] must start.*mod 16 = 2"):
        v.check_bias((torch.zeros(4, 256, dtype=torch.bfloat16), misaligned(torch.zeros(4, 256).bfloat16())), 4, 256)


def test_aligned_empty_and_copied_tensors_pass():
    v.check_base_alignment("x", torch.zeros(4, 256, dtype=torch.bfloat16))
    v.check_base_alignment("x", misaligned(torch.zeros(0, 256).bfloat16()))  # nothing is read
    # Not contiguous: the backends pass a fresh (aligned) contiguous() copy to the kernels.
    strided = misaligned(torch.zeros(256, 4).bfloat16()).t()
    assert not strided.is_contiguous() and strided.data_ptr() % 16 != 0
    v.check_base_alignment("x", strided)
    # Scales are read as single floats: a float32 view is 4-byte aligned whatever its offset.
    scales = torch.ones(5, 2)[1:]
    assert scales.data_ptr() % 16 == 8
    v.split_x((torch.zeros(4, 256).to(torch.float8_e4m3fn), scales))
