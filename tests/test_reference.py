"""The reference backend against the loop emulator in ep_comm.testing, on 1-4 gloo ranks.

One spawn per world size runs every case (spawning costs seconds on 2 cores). Expected values come
from the emulator, never from the code under test; copies must match bit for bit, and so must the
reductions, because both sides add in the same fixed order.
"""
from __future__ import annotations

import pytest
import torch

import ep_comm
from ep_comm import fp8
from ep_comm.testing import (calc_diff, expected_combine, expected_dispatch, expected_low_latency_combine,
                             expected_low_latency_dispatch, make_inputs)
from dist import run_ranks
from test_validation import misaligned

HIDDEN = 512
SEED = 20261123


def _tokens(rank: int, world: int, base: int) -> int:
    """Uneven token counts; the last rank of a multi-rank world has none."""
    return 0 if world > 1 and rank == world - 1 else base + 3 * rank


def _world_inputs(seed, world, base, num_topk, num_experts, masked_fraction=0.15):
    return [make_inputs(seed, r, _tokens(r, world, base), HIDDEN, num_topk, num_experts, masked_fraction)
            for r in range(world)]


def _check_normal(rank, world, buffer, seed):
    num_experts = 3 * world
    num_topk = min(4, num_experts)
    inputs = _world_inputs(seed, world, 24, num_topk, num_experts)
    mine = inputs[rank]
    n = mine.x.shape[0]

    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(mine.topk_idx, num_experts)
    dest = torch.where(mine.topk_idx >= 0, mine.topk_idx // 3, -1)
    expected_in_rank = torch.stack([(dest == r).any(1) for r in range(world)], 1).reshape(n, world)
    assert torch.equal(in_rank, expected_in_rank)
    assert per_rank.tolist() == expected_in_rank.sum(0).tolist()
    assert per_expert.tolist() == [int((mine.topk_idx == e).any(1).sum()) for e in range(num_experts)]
    assert per_rdma is None and event.event is None

    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    all_expected = [expected_dispatch(inputs, d, num_experts, 4) for d in range(world)]
    expected = all_expected[rank]
    for alignment in (1, 4):
        exp = expected if alignment == 4 else expected_dispatch(inputs, rank, num_experts, 1)
        for use_fp8 in (False, True):
            x = fp8.per_token_cast_to_fp8(mine.x) if use_fp8 else mine.x
            recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
                x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, expert_alignment=alignment, **layout)
            if use_fp8:
                want_x, want_scales = fp8.per_token_cast_to_fp8(exp.recv_x)
                assert torch.equal(recv_x[0].view(torch.uint8), want_x.view(torch.uint8))
                assert torch.equal(recv_x[1], want_scales)
            else:
                assert torch.equal(recv_x, exp.recv_x)
            assert torch.equal(recv_idx, exp.recv_topk_idx)
            assert torch.equal(recv_w, exp.recv_topk_weights)
            assert counts == exp.num_recv_tokens_per_expert

    # Worst-case padding: fixed row count, -1 ids and zero weights below the real rows.
    num_recv = expected.recv_x.shape[0]
    worst = num_recv + 5
    recv_x, recv_idx, recv_w, counts, worst_handle, _ = buffer.dispatch(
        mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_worst_tokens=worst, **layout)
    assert recv_x.shape[0] == worst and counts == []
    assert torch.equal(recv_x[:num_recv], expected.recv_x) and not recv_x[num_recv:].any()
    assert torch.equal(recv_idx[:num_recv], expected.recv_topk_idx) and (recv_idx[num_recv:] == -1).all()
    assert not recv_w[num_recv:].any()

    # Combine: every destination scales its rows by (its rank + 1), plus two biases.
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, **layout)
    scaled = [(e.recv_x.float() * (d + 1)).to(torch.bfloat16) for d, e in enumerate(all_expected)]
    g = torch.Generator().manual_seed(seed + rank)
    bias = (torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16),
            torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16))
    combined, combined_w, _ = buffer.combine(scaled[rank], handle, topk_weights=recv_w, bias=bias)
    assert torch.equal(combined, expected_combine(all_expected, scaled, rank, n, bias))
    assert torch.equal(combined_w, mine.topk_weights)
    # The same through the padded handle (padding rows are ignored) and without bias/weights.
    padded = torch.cat([scaled[rank], torch.randn(5, HIDDEN).to(torch.bfloat16)])
    combined, combined_w, _ = buffer.combine(padded, worst_handle)
    assert combined_w is None
    assert torch.equal(combined, expected_combine(all_expected, scaled, rank, n))

    # Round trip: combine of the unchanged rows = x times the number of destination ranks (exact).
    combined, _, _ = buffer.combine(recv_x, handle)
    assert torch.equal(combined, (mine.x.float() * in_rank.sum(1, keepdim=True)).to(torch.bfloat16))

    # Megatron-style: experts are the identity, probabilities 1/k, each rank reduces its local slots
    # before combine; the round trip gives x back (up to bf16 rounding of the partial sums).
    probs = torch.where(mine.topk_idx >= 0, 1.0 / (mine.topk_idx >= 0).sum(1, keepdim=True).clamp(min=1), 0.0)
    recv_x, recv_idx, recv_probs, _, handle, _ = buffer.dispatch(
        mine.x, topk_idx=mine.topk_idx, topk_weights=probs.float(), **layout)
    expert_out = (recv_x.float() * recv_probs.sum(1, keepdim=True)).to(torch.bfloat16)
    combined, _, _ = buffer.combine(expert_out, handle)
    routed = (mine.topk_idx >= 0).any(1)
    assert calc_diff(combined[routed], mine.x[routed]) < 1e-5

    # Cached dispatch (combine's backward): same layout, new data, no top-k outputs.
    x2 = (mine.x.float() * -2).to(torch.bfloat16)
    out = buffer.dispatch(x2, handle=handle)
    assert out[1:5] == (None, None, None, None)
    assert torch.equal(out[0], (expected.recv_x.float() * -2).to(torch.bfloat16))
    out = buffer.dispatch(fp8.per_token_cast_to_fp8(x2), handle=handle)
    assert torch.equal(out[0][1], fp8.per_token_cast_to_fp8((expected.recv_x.float() * -2).to(torch.bfloat16))[1])


def _check_low_latency(rank, world, buffer, seed):
    num_experts = 4 * world
    num_topk = min(3, num_experts)
    max_tokens = 16
    inputs = [make_inputs(seed, r, max_tokens if r == 0 else _tokens(r, world, 9), HIDDEN, num_topk, num_experts)
              for r in range(world)]
    mine = inputs[rank]
    per_rank = num_experts // world
    expected = expected_low_latency_dispatch(inputs, rank, num_experts)
    stats = torch.zeros(per_rank, dtype=torch.int32)
    calls = 0
    for use_fp8, round_scale, use_ue8m0 in ((False, False, False), (True, False, False), (True, True, False),
                                            (True, True, True)):
        for use_hook in (False, True):
            recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
                mine.x, mine.topk_idx, max_tokens, num_experts, cumulative_local_expert_recv_stats=stats,
                use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=use_hook)
            assert (hook is not None) == use_hook
            if use_hook:
                hook()
            calls += 1
            assert recv_count.tolist() == expected.recv_count
            rows = world * max_tokens
            if use_fp8:
                payload, scales = recv_x
                assert payload.shape == (per_rank, rows, HIDDEN) and scales.stride(1) == 1
                casts = [fp8.per_token_cast_to_fp8(inp.x, round_scale, use_ue8m0) for inp in inputs]
                for e, sources in enumerate(expected.rows):
                    for j, (src, t) in enumerate(sources):
                        assert torch.equal(payload[e, j].view(torch.uint8), casts[src][0][t].view(torch.uint8))
                        assert torch.equal(scales[e, j], casts[src][1][t])
            else:
                assert recv_x.shape == (per_rank, rows, HIDDEN)
                for e, sources in enumerate(expected.rows):
                    want = torch.stack([inputs[src].x[t] for src, t in sources]) if sources else recv_x[e, :0]
                    assert torch.equal(recv_x[e, :len(sources)], want)
    assert stats.tolist() == [c * calls for c in expected.recv_count]

    # Combine: expert e returns its rows scaled by (global e mod 3 + 1); weighted sum at the source.
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(mine.x, mine.topk_idx, max_tokens, num_experts,
                                                                   use_fp8=False)
    factors = torch.tensor([(rank * per_rank + e) % 3 + 1 for e in range(per_rank)], dtype=torch.float32)
    expert_out = (recv_x.float() * factors[:, None, None]).to(torch.bfloat16)
    want = expected_low_latency_combine(
        mine, lambda e, src, t: (inputs[src].x[t].float() * (e % 3 + 1)).to(torch.bfloat16), rank, num_experts, world)
    combined, event, hook = buffer.low_latency_combine(expert_out, mine.topk_idx, mine.topk_weights, handle)
    assert hook is None and torch.equal(combined, want)
    out = torch.empty_like(mine.x)
    combined, _, hook = buffer.low_latency_combine(expert_out, mine.topk_idx, mine.topk_weights, handle,
                                                   return_recv_hook=True, out=out)
    hook()
    assert combined.data_ptr() == out.data_ptr() and torch.equal(out, want)
    zero_copy_buffer = buffer.get_next_low_latency_combine_buffer(handle)
    zero_copy_buffer.copy_(expert_out)
    combined, _, _ = buffer.low_latency_combine(zero_copy_buffer, mine.topk_idx, mine.topk_weights, handle,
                                                zero_copy=True)
    assert torch.equal(combined, want)
    buffer.clean_low_latency_buffer(max_tokens, HIDDEN, num_experts)


def _check_bad_inputs(rank, world, seed):
    buffer = ep_comm.Buffer(backend="reference")
    num_experts = 2 * world
    inp = make_inputs(seed, rank, 8, HIDDEN, 2, num_experts)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)

    def raises(kind, pattern, fn):
        with pytest.raises(kind, match=pattern):
            fn()

    bad_idx = inp.topk_idx.clone()
    bad_idx[0, 0] = num_experts
    raises(ValueError, "num_experts is", lambda: buffer.get_dispatch_layout(bad_idx, num_experts))
    raises(ValueError, r"holds expert -\d", lambda: buffer.get_dispatch_layout(inp.topk_idx - 3, num_experts))
    raises(TypeError, "int64", lambda: buffer.get_dispatch_layout(inp.topk_idx.int(), num_experts))
    if world > 1:
        raises(ValueError, "divisible", lambda: buffer.get_dispatch_layout(inp.topk_idx, num_experts + 1))
    raises(TypeError, "bfloat16", lambda: buffer.dispatch(inp.x.float(), topk_idx=inp.topk_idx, **layout))
    raises(ValueError, "shape", lambda: buffer.dispatch(inp.x[:4], topk_idx=inp.topk_idx, **layout))
    raises(ValueError, "required", lambda: buffer.dispatch(inp.x, num_tokens_per_rank=per_rank))
    raises(ValueError, "16 bytes", lambda: buffer.dispatch(inp.x[:, :4], topk_idx=inp.topk_idx, **layout))
    raises(ValueError, "multiple of 128", lambda: buffer.dispatch(
        (inp.x[:, :144].float().to(torch.float8_e4m3fn), torch.ones(8, 1)), topk_idx=inp.topk_idx, **layout))
    raises(ValueError, "expert_alignment", lambda: buffer.dispatch(
        inp.x, topk_idx=inp.topk_idx, expert_alignment=0, **layout))
    _, _, _, _, handle, _ = buffer.dispatch(inp.x, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights, **layout)
    raises(ValueError, "shape", lambda: buffer.combine(inp.x[:0], handle) if handle.num_recv_rows else
           buffer.combine(inp.x[:1], handle))
    rows = torch.zeros(handle.num_recv_rows, HIDDEN, dtype=torch.bfloat16)
    raises(ValueError, "bias", lambda: buffer.combine(rows, handle, bias=torch.zeros(3, HIDDEN, dtype=torch.bfloat16)))
    raises(TypeError, "handle", lambda: buffer.combine(rows, "not a handle"))
    other = ep_comm.Buffer(backend="reference", low_latency_mode=True)
    raises(ValueError, "different", lambda: other.combine(rows, handle))
    raises(ValueError, "num_max_dispatch_tokens_per_rank", lambda: other.low_latency_dispatch(
        inp.x, inp.topk_idx, 4, num_experts))
    raises(ValueError, "round_scale", lambda: other.low_latency_dispatch(
        inp.x, inp.topk_idx, 8, num_experts, use_fp8=True, use_ue8m0=True))
    twice = inp.topk_idx.clone()
    twice[:, 1] = twice[:, 0].clamp(min=0)
    twice[:, 0] = twice[:, 1]
    raises(ValueError, "twice", lambda: other.low_latency_dispatch(inp.x, twice, 8, num_experts))
    raises(RuntimeError, "low_latency_mode", lambda: buffer.low_latency_dispatch(inp.x, inp.topk_idx, 8, num_experts))

    # Contiguous views that start off a 16-byte boundary (the kernels' vector accesses would trap).
    raises(ValueError, r"x must start on a 16-byte boundary.*mod 16 = 2", lambda: buffer.dispatch(
        misaligned(inp.x), topk_idx=inp.topk_idx, **layout))
    raises(ValueError, r"x\[0\] must start.*mod 16 = 1", lambda: buffer.dispatch(
        (misaligned(inp.x.float().to(torch.float8_e4m3fn)), torch.ones(8, HIDDEN // 128)), topk_idx=inp.topk_idx,
        **layout))
    raises(ValueError, r"x must start.*mod 16 = 2", lambda: buffer.combine(misaligned(rows), handle))
    raises(ValueError, r"bias\[0\] must start.*mod 16 = 2", lambda: buffer.combine(rows, handle, bias=misaligned(inp.x)))
    raises(ValueError, r"x must start.*mod 16 = 2", lambda: other.low_latency_dispatch(
        misaligned(inp.x), inp.topk_idx, 8, num_experts))
    ll_x, _, ll_handle, _, _ = other.low_latency_dispatch(inp.x, inp.topk_idx, 8, num_experts, use_fp8=False)
    raises(ValueError, r"out must start.*mod 16 = 2", lambda: other.low_latency_combine(
        ll_x, inp.topk_idx, inp.topk_weights, ll_handle, out=misaligned(torch.zeros(8, HIDDEN, dtype=torch.bfloat16))))

    # A bad input on rank 0 only: rank 0 gets its ValueError, the others a RuntimeError naming rank 0.
    if world > 1:
        mine = bad_idx if rank == 0 else inp.topk_idx
        if rank == 0:
            raises(ValueError, "num_experts is", lambda: buffer.dispatch(inp.x, topk_idx=mine, **layout))
        else:
            raises(RuntimeError, r"rank\(s\) \[0\] rejected", lambda: buffer.dispatch(inp.x, topk_idx=mine, **layout))
        # Misaligned on rank 0 only: refused before anything is sent, on every rank.
        x = misaligned(inp.x) if rank == 0 else inp.x
        raises(ValueError if rank == 0 else RuntimeError, "16-byte boundary" if rank == 0 else r"\[0\] rejected",
               lambda: buffer.dispatch(x, topk_idx=inp.topk_idx, **layout))

    # Buffers that differ across ranks are refused on every rank.
    if world > 1:
        raises(ValueError, "same", lambda: ep_comm.Buffer(backend="reference", num_nvl_bytes=1024 * (rank == 0)))

    # After all that, the buffers still work.
    inputs = [make_inputs(seed, r, 8, HIDDEN, 2, num_experts) for r in range(world)]
    recv_x, *_ = buffer.dispatch(inp.x, topk_idx=inp.topk_idx, **layout)
    assert torch.equal(recv_x, expected_dispatch(inputs, rank, num_experts).recv_x)
    other.destroy()
    raises(RuntimeError, "destroyed", lambda: other.low_latency_dispatch(inp.x, inp.topk_idx, 8, num_experts))


def _check_plain_functions(rank, world, seed):
    num_experts = 2 * world
    inputs = _world_inputs(seed + 7, world, 10, 2, num_experts)
    mine = inputs[rank]
    result = ep_comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_experts=num_experts, expert_alignment=2)
    expected = expected_dispatch(inputs, rank, num_experts, 2)
    assert torch.equal(result.recv_x, expected.recv_x)
    assert result.num_recv_tokens_per_expert == expected.num_recv_tokens_per_expert
    back = ep_comm.combine(result.recv_x, result.handle, topk_weights=result.recv_topk_weights)
    assert torch.equal(back.combined_topk_weights, mine.topk_weights)
    ll = ep_comm.low_latency_dispatch(mine.x, mine.topk_idx, 16, num_experts, use_fp8=False)
    assert ll.recv_x_scales is None and ll.recv_count.tolist() == \
        expected_low_latency_dispatch(inputs, rank, num_experts).recv_count
    combined = ep_comm.low_latency_combine(ll.recv_x, mine.topk_idx, mine.topk_weights, ll.handle).combined_x
    bigger = ep_comm.low_latency_dispatch(mine.x, mine.topk_idx, 32, num_experts, use_fp8=False)  # new (T, H, E)
    assert bigger.recv_x.shape[1] == 32 * world and torch.equal(bigger.recv_count, ll.recv_count)
    want = expected_low_latency_combine(mine, lambda e, s, t: inputs[s].x[t], rank, num_experts, world)
    assert torch.equal(combined, want)
    assert ep_comm.get_buffer() is ep_comm.get_buffer()


def _body(rank, world, group, seed):
    torch.manual_seed(seed)
    buffer = ep_comm.Buffer(group, low_latency_mode=True)  # auto: the reference on a machine without a GPU
    assert buffer.backend_kind == "reference"
    assert buffer.get_num_rdma_ranks() == 1 and buffer.get_rdma_rank() == 0
    try:
        _check_normal(rank, world, buffer, seed)
        _check_low_latency(rank, world, buffer, seed)
        _check_bad_inputs(rank, world, seed)
        _check_plain_functions(rank, world, seed)
    except BaseException:
        print(f"failed with seed {seed} on rank {rank}/{world}", flush=True)
        raise


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_reference_backend(world):
    run_ranks(_body, world, seed=SEED + world)
