"""Replays of the exact call sequences that vLLM, SGLang and Megatron-LM make into DeepEP, run on
ep_comm (3 gloo ranks, reference backend) and checked against a dense MoE: every rank rebuilds all
ranks' tokens from the seed and computes sum_k w_tk * f_{e_tk}(x_t) with the same expert functions.

Each test names the framework source it follows (repository, file, commit). The frameworks' own
code is not imported (none is installed here); the sequence of Buffer calls, their arguments and
what is done with the results between them are written out from that source. `import deep_ep`
goes through ep_comm.deep_ep.install(), as a deployment without DeepEP would.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

import ep_comm
import ep_comm.deep_ep
from dist import run_ranks
from ep_comm import fp8
from ep_comm.testing import calc_diff, make_inputs

WORLD = 3
NUM_EXPERTS = 6          # 2 per rank
NUM_TOPK = 3
NUM_TOKENS = 10
MAX_DIFF = 1e-4          # bf16 rounding of expert outputs and of the combined sum


class Experts:
    """Expert e: f_e(x) = x * scale_e + bias_e per channel (float32 math), the same on every rank."""

    def __init__(self, num_experts: int, hidden: int) -> None:
        g = torch.Generator().manual_seed(4242)
        self.scale = torch.rand(num_experts, hidden, generator=g) + 0.5
        self.bias = torch.randn(num_experts, hidden, generator=g) * 0.1

    def __call__(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale[expert] + self.bias[expert]


def dense_moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: Experts) -> torch.Tensor:
    """float32 [N, H]: sum over valid top-k slots of weight * expert(x)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k, e in enumerate(topk_idx[t].tolist()):
            if e >= 0:
                out[t] += topk_weights[t, k] * experts(e, x[t])
    return out


def fp8_roundtrip(x: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """What an FP8 dispatch delivers of x: the dense reference is computed on it."""
    return fp8.per_token_cast_back(*fp8.per_token_cast_to_fp8(x, round_scale=round_scale))


def check_close(got: torch.Tensor, want: torch.Tensor, what: str, seed: int) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)} (seed {seed})"
    diff = calc_diff(got.float(), want)
    assert diff < MAX_DIFF, f"{what}: calc_diff {diff:.3g} >= {MAX_DIFF} (seed {seed})"


def _import_deep_ep():
    ep_comm.deep_ep.install()
    import deep_ep  # noqa: F401 - what the frameworks do
    from deep_ep.utils import EventHandle, EventOverlap  # Megatron's import
    assert deep_ep is ep_comm.deep_ep and EventOverlap is ep_comm.EventOverlap and EventHandle is not None
    return deep_ep


# ---- vLLM: DeepEP high-throughput prepare/finalize -------------------------------------------------
def _vllm_ht_body(rank, world, group):
    """vllm-project/vllm @ 055e47c28003156421365af985d676fc921cb075,
    vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_ht.py (DeepEPHTPrepareAndFinalize:
    prepare_async -> _do_dispatch -> _receiver, _finalize with do_async) and
    vllm @ 001430048e8175c8dff1bc57e1a81a1fa75460f9, vllm/distributed/device_communicators/all2all.py
    (DeepEPHTAll2AllManager._make_all2all_kwargs, set_num_sms). DBO (micro-batch overlap) is off,
    so dbo_get_previous_event gives None."""
    deep_ep = _import_deep_ep()
    hidden = 256  # maybe_roundup_layer_hidden_size keeps bf16 hidden sizes that are multiples of 256
    buffer = deep_ep.Buffer(group=group, num_nvl_bytes=1024 * 1024 * 1024, num_rdma_bytes=0, low_latency_mode=False,
                            num_qps_per_rank=1, explicitly_destroy=True)
    deep_ep.Buffer.set_num_sms(min(20, deep_ep.Buffer.num_sms))
    experts = Experts(NUM_EXPERTS, hidden)
    experts_per_rank = NUM_EXPERTS // world
    rank_expert_offset = rank * experts_per_rank
    # The rank configs DeepEP tunes for; 3 ranks is not one of them, so vLLM passes config=None.
    config = deep_ep.Buffer.get_dispatch_config(world) if world in (2, 4, 8, 16, 24, 32, 64, 128, 144, 160) else None
    for seed, block_fp8, do_async in ((11, False, True), (12, True, True), (13, False, False)):
        inputs = [make_inputs(seed, r, NUM_TOKENS + r, hidden, NUM_TOPK, NUM_EXPERTS) for r in range(world)]
        mine = inputs[rank]
        # prepare_async: FP8 block quantisation happens before the dispatch, other dtypes after.
        if block_fp8:
            a1q, a1q_scale = fp8.per_token_cast_to_fp8(mine.x)
            token_data = (a1q, a1q_scale)
        else:
            token_data = mine.x
        previous_event = None
        num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank, event = \
            buffer.get_dispatch_layout(topk_idx=mine.topk_idx, num_experts=NUM_EXPERTS, previous_event=previous_event,
                                       async_finish=False, allocate_on_comm_stream=False)
        token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle, event = \
            buffer.dispatch(x=token_data, handle=None, num_tokens_per_rank=num_tokens_per_rank,
                            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                            num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=mine.topk_idx,
                            topk_weights=mine.topk_weights, expert_alignment=1, config=config,
                            previous_event=previous_event, async_finish=True, allocate_on_comm_stream=False)
        # _receiver
        if event.event is not None:
            event.current_stream_wait()
        expert_x = fp8.per_token_cast_back(*token_data) if block_fp8 else token_data
        expert_topk_ids = torch.where(expert_topk_ids == -1, NUM_EXPERTS - 1 if rank_expert_offset == 0 else 0,
                                      expert_topk_ids + rank_expert_offset)
        # The experts (expert_map: global id -> local, -1 off this rank) then TopKWeightAndReduceContiguous.
        local = (expert_topk_ids >= rank_expert_offset) & (expert_topk_ids < rank_expert_offset + experts_per_rank)
        assert sum(expert_num_tokens_per_expert_list) == int(local.sum()), (expert_num_tokens_per_expert_list, seed)
        fused_expert_output = torch.zeros(expert_x.shape, dtype=torch.float32)
        for m in range(expert_x.shape[0]):
            for k in range(NUM_TOPK):
                if local[m, k]:
                    fused_expert_output[m] += expert_topk_weights[m, k] * experts(int(expert_topk_ids[m, k]),
                                                                                  expert_x[m])
        fused_expert_output = fused_expert_output.to(torch.bfloat16)
        # _finalize
        output = torch.empty(mine.x.shape, dtype=torch.bfloat16)
        combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                              config=None if config is None else deep_ep.Buffer.get_combine_config(world),
                                              previous_event=None, async_finish=do_async,
                                              allocate_on_comm_stream=False)
        if do_async and event.event is not None:
            event.current_stream_wait()
        output.copy_(combined_x, non_blocking=True)
        want = dense_moe(fp8_roundtrip(mine.x) if block_fp8 else mine.x, mine.topk_idx, mine.topk_weights, experts)
        check_close(output, want, f"vLLM HT (fp8={block_fp8}, async={do_async})", seed)
    buffer.destroy()


def test_vllm_deepep_high_throughput():
    run_ranks(_vllm_ht_body, WORLD)


# ---- vLLM: DeepEP low-latency prepare/finalize -----------------------------------------------------
def _vllm_ll_body(rank, world, group):
    """vllm-project/vllm @ 055e47c28003156421365af985d676fc921cb075,
    vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_ll.py (DeepEPLLPrepareAndFinalize:
    prepare_async with return_recv_hook=True then hook(), _receiver/_do_quant, _finalize with
    out=output and return_recv_hook=do_async) and vllm @ 001430048e8175c8dff1bc57e1a81a1fa75460f9,
    vllm/distributed/device_communicators/all2all.py (DeepEPLLAll2AllManager._make_all2all_kwargs).
    At that commit vLLM leaves zero-copy combine as a TODO; the zero-copy round follows DeepEP's
    documented use (deepseek-ai/DeepEP, tests/legacy/test_low_latency.py): fill
    get_next_low_latency_combine_buffer(handle), then combine with zero_copy=True."""
    deep_ep = _import_deep_ep()
    hidden = 2048  # the smallest of DeepEPLLPrepareAndFinalize.SUPPORTED_HIDDEN_SIZES
    max_tokens_per_rank = 8
    experts_per_rank = NUM_EXPERTS // world
    buffer = deep_ep.Buffer(
        group=group, num_nvl_bytes=1024 * 1024 * 1024,
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank=max_tokens_per_rank, hidden=hidden, num_ranks=world,
            num_experts=NUM_EXPERTS),
        low_latency_mode=True, num_qps_per_rank=experts_per_rank, allow_nvlink_for_low_latency_mode=True,
        allow_mnnvl=False, explicitly_destroy=True, enable_shrink=False)
    experts = Experts(NUM_EXPERTS, hidden)
    # (seed, use_fp8_dispatch, use_ue8m0_dispatch (post_init_setup), finalize_async, zero_copy)
    rounds = ((21, False, False, True, False), (22, True, False, False, False), (23, True, True, True, False),
              (24, False, False, False, True))
    for seed, use_fp8, use_ue8m0, do_async, zero_copy in rounds:
        inputs = [make_inputs(seed, r, max_tokens_per_rank - r, hidden, NUM_TOPK, NUM_EXPERTS) for r in range(world)]
        mine = inputs[rank]
        # prepare_async, then prepare() runs the hook and the receiver
        expert_x, expert_num_tokens, handle, _, hook = buffer.low_latency_dispatch(
            mine.x, mine.topk_idx, max_tokens_per_rank, NUM_EXPERTS, use_fp8=use_fp8, round_scale=use_ue8m0,
            use_ue8m0=use_ue8m0, async_finish=False, return_recv_hook=True)
        hook()
        # _do_quant with block_shape [128, 128]: DeepEP already quantised, (x, scales) pass through;
        # the experts (batched, masked by expert_num_tokens) dequantise.
        if use_fp8:
            x_fp8, x_scales = expert_x
            assert x_fp8.dtype == torch.float8_e4m3fn and x_scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
            expert_x = fp8.per_token_cast_back(x_fp8, x_scales)
        assert expert_x.shape == (experts_per_rank, world * max_tokens_per_rank, hidden)
        fused_expert_output = torch.zeros(expert_x.shape, dtype=torch.bfloat16)
        for e in range(experts_per_rank):
            n = int(expert_num_tokens[e])
            fused_expert_output[e, :n] = experts(rank * experts_per_rank + e, expert_x[e, :n]).to(torch.bfloat16)
        # _finalize: the combine kernel applies the weights and reduces
        output = torch.empty(mine.x.shape, dtype=torch.bfloat16)
        if zero_copy:
            buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = fused_expert_output
        _, _, recv_hook = buffer.low_latency_combine(fused_expert_output, mine.topk_idx, mine.topk_weights, handle,
                                                     async_finish=False, zero_copy=zero_copy,
                                                     return_recv_hook=do_async, out=output)
        if do_async:
            recv_hook()
        else:
            assert recv_hook is None
        x_sent = fp8_roundtrip(mine.x, round_scale=use_ue8m0) if use_fp8 else mine.x
        check_close(output, dense_moe(x_sent, mine.topk_idx, mine.topk_weights, experts),
                    f"vLLM LL (fp8={use_fp8}, ue8m0={use_ue8m0}, async={do_async}, zero_copy={zero_copy})", seed)
    for refused in (lambda: buffer.low_latency_query_mask_buffer(torch.zeros(world, dtype=torch.int32)),
                    lambda: buffer.get_local_buffer_tensor(dtype=torch.int8, use_rdma_buffer=True)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            refused()
    buffer.destroy()


def test_vllm_deepep_low_latency():
    run_ranks(_vllm_ll_body, WORLD)
