"""Replays of the exact call sequences that vLLM, SGLang and Megatron-LM make into DeepEP, run on
ep_comm (3 gloo ranks, reference backend; the emulated kernels too) and checked against a dense MoE: every rank rebuilds all
ranks' tokens from the seed and computes sum_k w_tk * f_{e_tk}(x_t) with the same expert functions.

Each test names the framework source it follows (repository, file, commit). The frameworks' own
code is not imported (none is installed here); the sequence of Buffer calls, their arguments and
what is done with the results between them are written out from that source. `import deep_ep`
goes through ep_comm.deep_ep.install(), as a deployment without DeepEP would.
"""
from __future__ import annotations

import sys

import pytest
import torch

import ep_comm
import ep_comm.deep_ep
from ep_comm import _ext
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


def weight_and_reduce(expert_x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      experts: Experts) -> torch.Tensor:
    """bf16: each row's experts (global ids, -1 skipped), weighted and summed (vLLM's
    TopKWeightAndReduceContiguous after the experts): one output row per input row."""
    out = torch.zeros(expert_x.shape, dtype=torch.float32)
    for m in range(expert_x.shape[0]):
        for k in range(topk_ids.shape[1]):
            if topk_ids[m, k] >= 0:
                out[m] += topk_weights[m, k] * experts(int(topk_ids[m, k]), expert_x[m])
    return out.to(torch.bfloat16)


def fp8_roundtrip(x: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """What an FP8 dispatch delivers of x: the dense reference is computed on it."""
    return fp8.per_token_cast_back(*fp8.per_token_cast_to_fp8(x, round_scale=round_scale))


def check_close(got: torch.Tensor, want: torch.Tensor, what: str, seed: int) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)} (seed {seed})"
    diff = calc_diff(got.detach().float(), want.detach())
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
    Buffer = deep_ep.Buffer
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
                                              config=None if config is None else Buffer.get_combine_config(world),
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
            assert x_fp8.dtype == torch.float8_e4m3fn
            assert x_scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
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


# ---- SGLang: DeepEPDispatcher, normal (prefill) and low-latency (decode) on one AUTO-mode buffer ---
def _sglang_body(rank, world, group):
    """sgl-project/sglang @ 003a81bf2870c07b110de13641ad4f0ba63b1fa1,
    python/sglang/srt/layers/moe/token_dispatcher/deepep.py: DeepEPBuffer.get_deepep_buffer (AUTO
    mode: one Buffer sized for both modes, low_latency_mode=True, allow_mnnvl=True),
    set_dispatch_mode_as_low_latency (clean_low_latency_buffer when coming from normal mode),
    DeepEPConfig (Config(**json)), _DeepEPDispatcherImplNormal (async_finish=True: Buffer.capture(),
    allocate_on_comm_stream, expert_alignment=128 under DeepGEMM, dispatch_a/b, combine_a/b) and
    _DeepEPDispatcherImplLowLatency (return_recv_hook on and off: async_finish=not return_recv_hook).
    A prefill step runs normal mode, a decode step low-latency mode, then prefill again; then the
    DeepEP V2 dispatcher (_sglang_v2_steps)."""
    _import_deep_ep()
    from deep_ep import Buffer, Config
    hidden, params_bytes = 256, 2              # DeepEPOutputDtype.BF16
    num_max_dispatch_tokens_per_rank = 16     # SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK
    experts_per_rank = NUM_EXPERTS // world
    experts = Experts(NUM_EXPERTS, hidden)
    # DeepEPConfig from a --deepep-config JSON
    json_config = {"normal_dispatch": dict(num_sms=24, num_max_nvl_chunked_send_tokens=8,
                                           num_max_nvl_chunked_recv_tokens=256, num_max_rdma_chunked_send_tokens=6,
                                           num_max_rdma_chunked_recv_tokens=128),
                   "normal_combine": dict(num_sms=24, num_max_nvl_chunked_send_tokens=6,
                                          num_max_nvl_chunked_recv_tokens=256, num_max_rdma_chunked_send_tokens=6,
                                          num_max_rdma_chunked_recv_tokens=128)}
    normal_dispatch_config = Config(**json_config["normal_dispatch"])
    normal_combine_config = Config(**json_config["normal_combine"])
    num_sms = json_config["normal_dispatch"]["num_sms"]
    # DeepEPBuffer.get_deepep_buffer, DeepEPMode.AUTO
    num_nvl_bytes, num_rdma_bytes = 0, 0
    hidden_bytes = hidden * params_bytes
    for config in (normal_dispatch_config or Buffer.get_dispatch_config(group.size()),
                   normal_combine_config or Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    num_rdma_bytes = max(Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, group.size(),
                                                               NUM_EXPERTS), num_rdma_bytes)
    num_qps_per_rank = max(num_sms, NUM_EXPERTS // group.size())
    buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=num_qps_per_rank,
                    allow_mnnvl=True)
    mode = None

    def normal_step(seed: int) -> None:
        nonlocal mode
        mode = "normal"  # set_dispatch_mode_as_normal
        inputs = [make_inputs(seed, r, NUM_TOKENS + 2 * r, hidden, NUM_TOPK, NUM_EXPERTS) for r in range(world)]
        mine = inputs[rank]
        # dispatch_a
        topk_ids = mine.topk_idx.to(torch.int64)
        previous_event = Buffer.capture()
        # dispatch_b -> _dispatch_core
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
            buffer.get_dispatch_layout(topk_ids, NUM_EXPERTS, previous_event=previous_event, async_finish=True,
                                       allocate_on_comm_stream=previous_event is not None)
        recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle, event = buffer.dispatch(
            mine.x, topk_idx=topk_ids, topk_weights=mine.topk_weights, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
            allocate_on_comm_stream=(previous_event is not None) and True, expert_alignment=128,
            config=normal_dispatch_config)
        event.current_stream_wait()
        assert all(n % 128 == 0 for n in num_recv_tokens_per_expert), num_recv_tokens_per_expert
        # The DeepGEMM runner: each received token's local experts, weighted and summed.
        output = torch.zeros(recv_x.shape, dtype=torch.float32)
        for m in range(recv_x.shape[0]):
            for k in range(NUM_TOPK):
                local = int(recv_topk_ids[m, k])
                if local >= 0:
                    output[m] += recv_topk_weights[m, k] * experts(rank * experts_per_rank + local, recv_x[m])
        output = output.to(torch.bfloat16)
        # combine_a / combine_b -> _combine_core
        previous_event = Buffer.capture()
        combined_x, _, event = buffer.combine(output, handle, async_finish=True, previous_event=previous_event,
                                              allocate_on_comm_stream=previous_event is not None,
                                              config=normal_combine_config)
        event.current_stream_wait()
        check_close(combined_x, dense_moe(mine.x, mine.topk_idx, mine.topk_weights, experts), "SGLang normal", seed)

    def low_latency_step(seed: int, return_recv_hook: bool, use_fp8: bool) -> None:
        nonlocal mode
        if mode == "normal":  # set_dispatch_mode_as_low_latency
            buffer.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, NUM_EXPERTS)
        mode = "low_latency"
        inputs = [make_inputs(seed, r, num_max_dispatch_tokens_per_rank - 3 * r, hidden, NUM_TOPK, NUM_EXPERTS)
                  for r in range(world)]
        mine = inputs[rank]
        # dispatch_a -> _dispatch_core
        topk_ids = mine.topk_idx.to(torch.int64)
        expected_m = (mine.x.shape[0] * buffer.group_size * topk_ids.shape[1] + NUM_EXPERTS) // NUM_EXPERTS
        packed_recv_hidden, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
            mine.x, topk_ids, num_max_dispatch_tokens_per_rank, NUM_EXPERTS, use_fp8=use_fp8,
            async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
        # dispatch_b
        hook() if return_recv_hook else event.current_stream_wait()
        if isinstance(packed_recv_hidden, tuple):
            hidden_states = fp8.per_token_cast_back(*packed_recv_hidden)
        else:
            hidden_states = packed_recv_hidden
        masked_m = packed_recv_count
        assert expected_m > 0 and masked_m.dtype == torch.int32
        # The masked grouped GEMM over [E_local, R*T, H], rows < masked_m[e]
        expert_out = torch.zeros(hidden_states.shape, dtype=torch.bfloat16)
        for e in range(experts_per_rank):
            n = int(masked_m[e])
            expert_out[e, :n] = experts(rank * experts_per_rank + e, hidden_states[e, :n]).to(torch.bfloat16)
        # combine_a -> _combine_core, combine_b
        combined, event, hook = buffer.low_latency_combine(
            x=expert_out, topk_idx=topk_ids, topk_weights=mine.topk_weights, handle=handle,
            async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
        hook() if return_recv_hook else event.current_stream_wait()
        x_sent = fp8_roundtrip(mine.x) if use_fp8 else mine.x
        check_close(combined, dense_moe(x_sent, mine.topk_idx, mine.topk_weights, experts),
                    f"SGLang low-latency (hook={return_recv_hook}, fp8={use_fp8})", seed)

    normal_step(31)
    low_latency_step(32, return_recv_hook=False, use_fp8=False)
    low_latency_step(33, return_recv_hook=True, use_fp8=True)
    normal_step(34)
    low_latency_step(35, return_recv_hook=True, use_fp8=False)
    buffer.destroy()
    _sglang_v2_steps(rank, world, group)


def _sglang_v2_steps(rank, world, group):
    """sgl-project/sglang @ 0134da0b075f75274c6af785a9bdf543239ba37c,
    python/sglang/srt/layers/moe/token_dispatcher/deepep_v2.py (DeepEPv2Buffer.get_buffer,
    _DeepEPv2Impl.dispatch/combine): decode uses the expanded layout without CPU sync (a masked
    GEMM over psum_num_recv_tokens_per_expert, expert_alignment 128), prefill the contiguous layout
    cut at psum_num_recv_tokens_per_scaleup_rank[-1]."""
    from deep_ep import ElasticBuffer
    hidden, max_tokens_per_rank = 256, 16
    experts_per_rank = NUM_EXPERTS // world
    rank_expert_offset = rank * experts_per_rank
    experts = Experts(NUM_EXPERTS, hidden)
    expert_alignment = 128
    buffer = ElasticBuffer(group, num_max_tokens_per_rank=max_tokens_per_rank, hidden=hidden, num_topk=NUM_TOPK,
                           use_fp8_dispatch=False, allow_hybrid_mode=False, sl_idx=0, prefer_overlap_with_compute=False)
    num_sms = buffer.get_theoretical_num_sms(NUM_EXPERTS, NUM_TOPK)
    num_qps = buffer.get_theoretical_num_qps(num_sms)
    for seed, use_expand_layout in ((56, True), (57, False), (58, True)):
        inputs = [make_inputs(seed, r, max_tokens_per_rank - 5 * r, hidden, NUM_TOPK, NUM_EXPERTS)
                  for r in range(world)]
        mine = inputs[rank]
        recv_x, recv_topk_idx, recv_topk_weights, handle, event = buffer.dispatch(
            mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_experts=NUM_EXPERTS,
            num_max_tokens_per_rank=max_tokens_per_rank, expert_alignment=expert_alignment, num_sms=num_sms,
            num_qps=num_qps, use_tma_aligned_col_major_sf=False, do_cpu_sync=not use_expand_layout,
            do_expand=use_expand_layout)
        if event.event is not None:
            event.current_stream_wait()
        if use_expand_layout:
            # The masked grouped GEMM: expert e's rows start at align(psum[e-1]) and number psum[e] - start.
            psum = handle.psum_num_recv_tokens_per_expert.tolist()
            expert_out = torch.zeros(recv_x.shape, dtype=torch.float32)
            begin = 0
            for e in range(experts_per_rank):
                count = psum[e] - begin
                rows = slice(begin, begin + count)
                expert_out[rows] = experts(rank_expert_offset + e, recv_x[rows]) * recv_topk_weights[rows, None]
                begin = (psum[e] + expert_alignment - 1) // expert_alignment * expert_alignment
            assert recv_x.shape[0] >= begin
        else:
            num_recv_tokens = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1].item())
            recv_x, recv_topk_idx = recv_x[:num_recv_tokens], recv_topk_idx[:num_recv_tokens]
            recv_topk_weights = recv_topk_weights[:num_recv_tokens]
            assert all(n % expert_alignment == 0 for n in handle.num_recv_tokens_per_expert_list)
            global_ids = torch.where(recv_topk_idx >= 0, recv_topk_idx + rank_expert_offset, -1)
            expert_out = weight_and_reduce(recv_x, global_ids, recv_topk_weights, experts).float()
        combined_x, combined_weights, event = buffer.combine(expert_out.to(torch.bfloat16), handle=handle,
                                                             topk_weights=recv_topk_weights, num_sms=num_sms,
                                                             num_qps=num_qps)
        if event.event is not None:
            event.current_stream_wait()
        what = f"SGLang DeepEP V2 (expanded={use_expand_layout})"
        check_close(combined_x, dense_moe(mine.x, mine.topk_idx, mine.topk_weights, experts), what, seed)
        assert torch.equal(combined_weights, mine.topk_weights), (what + " combined weights", seed)
    buffer.destroy()


def test_sglang_deepep_dispatcher():
    run_ranks(_sglang_body, WORLD)


# ---- Megatron-LM: the flex dispatcher's fused_dispatch / fused_combine, forward and backward ------
def _megatron_body(rank, world, group):
    """NVIDIA/Megatron-LM @ d98e8a64ddf34856e74b24714e3bedb2f5a39553:
    megatron/core/transformer/moe/token_dispatcher.py (_DeepepManager: set_deepep_num_sms in
    __init__, setup_metadata (topk of the probs, -1 where a capacity factor dropped the token),
    dispatch -> fused_dispatch, _indices_to_multihot + permute of the dispatched probs, the experts
    scaling their outputs by the permuted probs, unpermute, combine -> fused_combine) with
    fused_a2a.py's functions taken from ep_comm.megatron; then a backward through all of it. Run
    with async_finish / allocate_on_comm_stream off and on (the overlapped schedule)."""
    from ep_comm import megatron
    hidden = 256
    experts_per_rank = NUM_EXPERTS // world
    experts = Experts(NUM_EXPERTS, hidden)
    megatron.set_deepep_num_sms(20)  # moe_flex_dispatcher_num_sms unset -> 20
    for seed, async_finish, capacity_factor in ((41, False, None), (42, True, 1.0)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
        all_x, all_probs, all_grads = [], [], []
        for r in range(world):
            num_tokens = NUM_TOKENS + r
            all_x.append((torch.randn(num_tokens, hidden, generator=g) * 2).to(torch.bfloat16))
            scores = torch.rand(num_tokens, NUM_EXPERTS, generator=g)
            if capacity_factor is not None:  # a dropped (token, expert) pair has probability 0
                scores = torch.where(torch.rand(num_tokens, NUM_EXPERTS, generator=g) < 0.15, 0.0, scores)
            all_probs.append(scores)
            all_grads.append(torch.randn(num_tokens, hidden, generator=g))
        x = all_x[rank].clone().requires_grad_(True)
        probs = all_probs[rank].clone().requires_grad_(True)
        # setup_metadata
        token_probs, token_indices = torch.topk(probs, NUM_TOPK, dim=-1)
        if capacity_factor is not None:
            token_indices = token_indices.masked_fill(token_probs == 0, -1)
        token_probs = token_probs.float()
        # dispatch
        recv_x, dispatched_indices, dispatched_probs, tokens_per_expert, handle = megatron.fused_dispatch(
            x, token_indices, token_probs, NUM_EXPERTS, group, async_finish=async_finish,
            allocate_on_comm_stream=async_finish)
        assert tokens_per_expert.dtype == torch.int64 and tokens_per_expert.shape == (experts_per_rank,)
        # _indices_to_multihot, permute, the experts (probs applied inside), unpermute
        mask = dispatched_indices != -1
        multihot_probs = torch.zeros(recv_x.shape[0], experts_per_rank, dtype=torch.float32)
        rows = torch.arange(recv_x.shape[0]).repeat_interleave(mask.sum(dim=1))
        multihot_probs = multihot_probs.index_put((rows, dispatched_indices[mask]), dispatched_probs[mask])
        assert int((multihot_probs > 0).sum()) <= int(tokens_per_expert.sum())
        expert_output = torch.zeros(recv_x.shape, dtype=torch.float32)
        for e in range(experts_per_rank):
            routed = (dispatched_indices == e).any(dim=1)
            out_e = experts(rank * experts_per_rank + e, recv_x[routed]) * multihot_probs[routed, e:e + 1]
            expert_output = expert_output.index_add(0, routed.nonzero().squeeze(1), out_e)
        # combine
        output, _ = megatron.fused_combine(expert_output.to(torch.bfloat16), group, handle,
                                           async_finish=async_finish, allocate_on_comm_stream=async_finish)
        (output.float() * all_grads[rank]).sum().backward()

        # The dense model on this rank's tokens, in float32 from the same bf16 inputs.
        dense_x = all_x[rank].float().clone().requires_grad_(True)
        dense_probs = all_probs[rank].clone().requires_grad_(True)
        top_probs, top_indices = torch.topk(dense_probs, NUM_TOPK, dim=-1)
        dense_out = torch.zeros(dense_x.shape)
        for k in range(NUM_TOPK):
            for e in range(NUM_EXPERTS):
                chosen = (top_indices[:, k] == e) & (top_probs[:, k] != 0 if capacity_factor is not None else True)
                dense_out = dense_out + torch.where(chosen[:, None], experts(e, dense_x) * top_probs[:, k:k + 1], 0.0)
        (dense_out * all_grads[rank]).sum().backward()
        check_close(output, dense_out.detach(), f"Megatron forward (async={async_finish})", seed)
        check_close(x.grad, dense_x.grad, f"Megatron grad of x (async={async_finish})", seed)
        check_close(probs.grad, dense_probs.grad, f"Megatron grad of probs (async={async_finish})", seed)
    megatron.reset_buffer()


def test_megatron_flex_dispatcher_forward_and_backward():
    run_ranks(_megatron_body, WORLD)


@pytest.mark.skipif(not _ext.emulated_available(), reason="ep_comm._C_emu is not built")
@pytest.mark.parametrize("body", [_vllm_ht_body, _vllm_ll_body, _sglang_body, _megatron_body],
                         ids=["vllm_ht", "vllm_ll", "sglang", "megatron"])
def test_replays_on_the_emulated_kernels(body, monkeypatch):
    """The same sequences through the intranode and low-latency kernels on the emulated device (the
    spawned ranks inherit EP_COMM_BACKEND)."""
    monkeypatch.setenv("EP_COMM_BACKEND", "emulated")
    run_ranks(_recording_backends, WORLD, replay=body)


def _recording_backends(rank, world, group, replay):
    """Runs `replay` and checks that every Buffer it made (DeepEP facades included) ran on the emulated device."""
    kinds = []
    init = ep_comm.Buffer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        kinds.append(self.backend_kind)
    ep_comm.Buffer.__init__ = recording_init
    try:
        replay(rank, world, group)
    finally:
        ep_comm.Buffer.__init__ = init
    assert kinds and set(kinds) == {"emulated"}, kinds


# ---- the opt-in itself ---------------------------------------------------------------------------
def test_install_never_shadows_a_real_deep_ep(tmp_path, monkeypatch):
    """install() registers `deep_ep` only where DeepEP is not importable; a real one makes it raise
    unless replace_installed=True, which warns."""
    saved = {name: sys.modules.pop(name) for name in ("deep_ep", "deep_ep.utils") if name in sys.modules}
    try:
        assert ep_comm.deep_ep.install() is ep_comm.deep_ep
        assert ep_comm.deep_ep.install() is ep_comm.deep_ep  # idempotent
        import deep_ep
        assert deep_ep.Buffer is ep_comm.deep_ep.Buffer and deep_ep.topk_idx_t == torch.int64
        for name in ("deep_ep", "deep_ep.utils"):
            sys.modules.pop(name)
        fake = tmp_path / "deep_ep"
        fake.mkdir()
        (fake / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(RuntimeError, match="real DeepEP"):
            ep_comm.deep_ep.install()
        assert "deep_ep" not in sys.modules
        with pytest.warns(RuntimeWarning, match="not the installed DeepEP"):
            ep_comm.deep_ep.install(replace_installed=True)
        assert sys.modules["deep_ep"] is ep_comm.deep_ep
        for name in ("deep_ep", "deep_ep.utils"):
            sys.modules.pop(name)
        monkeypatch.setenv("EP_COMM_PROVIDE_DEEP_EP", "0")
        assert ep_comm.deep_ep.install_from_env() is None and "deep_ep" not in sys.modules
        monkeypatch.setenv("EP_COMM_PROVIDE_DEEP_EP", "1")
        with pytest.raises(RuntimeError, match="real DeepEP"):
            ep_comm.deep_ep.install_from_env()
    finally:
        for name in ("deep_ep", "deep_ep.utils"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def test_import_ep_comm_provides_deep_ep_on_request():
    """EP_COMM_PROVIDE_DEEP_EP=1 makes `import ep_comm` install the drop-in; without it nothing is
    registered."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = "import ep_comm, sys; print('deep_ep' in sys.modules and sys.modules['deep_ep'] is ep_comm.deep_ep)"
    for value, expected in (("1", "True"), ("0", "False")):
        env = dict(os.environ, EP_COMM_PROVIDE_DEEP_EP=value,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr


# ---- DeepEP V2 ElasticBuffer: vLLM's deepep_v2 prepare/finalize and DeepEP's training pattern -----
def _elastic_body(rank, world, group):
    """vllm-project/vllm @ 02bd2a494f5c722c044ded73cb16e766e8007f0d,
    vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_v2.py (DeepEPV2PrepareAndFinalize:
    decode mode do_expand=False/do_cpu_sync=False with a power-of-two num_max_tokens_per_rank,
    recv_topk_idx made global and cut at psum_num_recv_tokens_per_scaleup_rank[-1]; prefill mode
    do_expand=True/do_cpu_sync=True with topk ids rebuilt from num_recv_tokens_per_expert_list;
    combine with async_with_compute_stream and allocate_on_comm_stream), and deepseek-ai/DeepEP @
    dd758caf451848bd150e1046af3d0a73e5fff38d, README.md (get_buffer with get_buffer_size_hint,
    training: dispatch/combine forward, combine as dispatch's backward, cached dispatch as combine's
    backward; decoding: dispatch with a cached handle)."""
    _import_deep_ep()
    from deep_ep import ElasticBuffer
    hidden, max_tokens_per_rank = 256, 16
    experts_per_rank = NUM_EXPERTS // world
    rank_expert_offset = rank * experts_per_rank
    experts = Experts(NUM_EXPERTS, hidden)
    required_bytes = ElasticBuffer.get_buffer_size_hint(group, max_tokens_per_rank, hidden, num_topk=NUM_TOPK)
    buffer = ElasticBuffer(group, num_max_tokens_per_rank=max_tokens_per_rank, hidden=hidden, num_topk=NUM_TOPK,
                           explicitly_destroy=True)
    assert buffer.num_bytes >= required_bytes and buffer.get_logical_domain_size() == (1, world)
    num_sms = buffer.get_theoretical_num_sms(NUM_EXPERTS, NUM_TOPK)

    for seed, use_cudagraph in ((51, True), (52, False), (53, True)):
        inputs = [make_inputs(seed, r, NUM_TOKENS - 2 * r, hidden, NUM_TOPK, NUM_EXPERTS) for r in range(world)]
        mine = inputs[rank]
        do_expand = do_cpu_sync = not use_cudagraph
        num_max_tokens_per_rank = None
        if not do_expand:
            n = max(inp.x.shape[0] for inp in inputs)  # dp_metadata.num_tokens_across_dp_cpu.max()
            num_max_tokens_per_rank = min(1 << max(n - 1, 0).bit_length(), max_tokens_per_rank)
        recv_x, recv_topk_idx, recv_topk_weights, handle, event = buffer.dispatch(
            x=mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_experts=NUM_EXPERTS,
            num_max_tokens_per_rank=num_max_tokens_per_rank, do_expand=do_expand, do_cpu_sync=do_cpu_sync,
            async_with_compute_stream=False)
        # _receiver
        if event.event is not None:
            event.current_stream_wait()
        psum = handle.psum_num_recv_tokens_per_scaleup_rank
        expected_sources = [sum(1 for t in range(inp.x.shape[0])
                                if any(e // experts_per_rank == rank for e in inp.topk_idx[t].tolist() if e >= 0))
                            for inp in inputs]
        assert psum.tolist() == torch.tensor(expected_sources).cumsum(0).tolist(), (psum, expected_sources, seed)
        counts = handle.num_recv_tokens_per_expert_list
        if recv_topk_idx is None:  # prefill: expanded rows, ids from the per-expert counts
            assert do_expand and counts and recv_topk_weights.ndim == 1
            recv_topk_idx = torch.repeat_interleave(torch.arange(experts_per_rank) + rank_expert_offset,
                                                    torch.tensor(counts), output_size=sum(counts)).unsqueeze(1)
            assert recv_x.shape[0] == sum(counts) == handle.num_expanded_tokens
        else:  # decode: worst-case rows; global ids below psum[-1], -1 elsewhere
            assert not counts and recv_x.shape[0] == world * num_max_tokens_per_rank
            rows = torch.arange(recv_topk_idx.shape[0]).unsqueeze(1)
            recv_topk_idx = torch.where((recv_topk_idx >= 0) & (rows < psum[-1]), recv_topk_idx + rank_expert_offset,
                                        -1)
        if recv_topk_weights is not None and recv_topk_weights.ndim == 1:
            recv_topk_weights = recv_topk_weights.unsqueeze(1)
        # _finalize (finalize_async)
        fused_expert_output = weight_and_reduce(recv_x, recv_topk_idx, recv_topk_weights, experts)
        output = torch.empty(mine.x.shape, dtype=torch.bfloat16)
        combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                              async_with_compute_stream=True, allocate_on_comm_stream=True)
        if event.event is not None:
            event.current_stream_wait()
        output.copy_(combined_x, non_blocking=True)
        check_close(output, dense_moe(mine.x, mine.topk_idx, mine.topk_weights, experts),
                    f"vLLM DeepEP V2 (cudagraph={use_cudagraph})", seed)
        if use_cudagraph:  # decoding with the cached handle: the same routing, new activations
            x2 = (mine.x.float() * 0.5).to(torch.bfloat16)
            recv_x2, _, _, same, _ = buffer.dispatch(x2, handle=handle, num_sms=num_sms,
                                                     async_with_compute_stream=True)
            assert same is handle
            out2 = weight_and_reduce(recv_x2, recv_topk_idx, recv_topk_weights, experts)
            combined2, _, _ = buffer.combine(out2, handle=handle, num_sms=num_sms, async_with_compute_stream=True)
            check_close(combined2, dense_moe(x2, mine.topk_idx, mine.topk_weights, experts), "V2 cached decode", seed)

    # Training (DeepEP README): forward and backward through dispatch and combine, expanded and not.
    class Dispatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, topk_idx, topk_weights, do_expand):
            recv_x, recv_topk_idx, recv_topk_weights, handle, event = buffer.dispatch(
                x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=NUM_EXPERTS,
                num_max_tokens_per_rank=max_tokens_per_rank, num_sms=num_sms, async_with_compute_stream=True,
                do_expand=do_expand)
            event.current_stream_wait()
            ctx.handle = handle
            return recv_x, recv_topk_weights, handle, recv_topk_idx

        @staticmethod
        def backward(ctx, grad_recv_x, grad_recv_topk_weights, _grad_handle, _grad_idx):
            grad_x, grad_weights, event = buffer.combine(grad_recv_x.contiguous(), handle=ctx.handle,
                                                         topk_weights=grad_recv_topk_weights.float(),
                                                         num_sms=num_sms, async_with_compute_stream=True)
            event.current_stream_wait()
            return grad_x, None, grad_weights, None

    class Combine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, handle):
            combined_x, _, event = buffer.combine(x, handle=handle, num_sms=num_sms, async_with_compute_stream=True)
            event.current_stream_wait()
            ctx.handle = handle
            return combined_x

        @staticmethod
        def backward(ctx, grad_combined_x):
            grad_x, _, _, _, event = buffer.dispatch(grad_combined_x.contiguous(), handle=ctx.handle,
                                                     num_sms=num_sms, async_with_compute_stream=True)
            event.current_stream_wait()
            return grad_x, None

    for seed, do_expand in ((54, False), (55, True)):
        inputs = [make_inputs(seed, r, NUM_TOKENS + r, hidden, NUM_TOPK, NUM_EXPERTS) for r in range(world)]
        mine = inputs[rank]
        grad_out = torch.randn(mine.x.shape, generator=torch.Generator().manual_seed(seed + rank))
        x = mine.x.clone().requires_grad_(True)
        weights = mine.topk_weights.clone().requires_grad_(True)
        recv_x, recv_weights, handle, recv_topk_idx = Dispatch.apply(x, mine.topk_idx, weights, do_expand)
        if do_expand:
            ids = torch.repeat_interleave(torch.arange(experts_per_rank), torch.tensor(
                handle.num_recv_tokens_per_expert_list)).unsqueeze(1)
            recv_weights = recv_weights.unsqueeze(1)
        else:
            ids = recv_topk_idx
        expert_out = torch.zeros(recv_x.shape)
        for e in range(experts_per_rank):
            for k in range(ids.shape[1]):
                chosen = (ids[:, k] == e)[:, None]
                expert_out = expert_out + torch.where(
                    chosen, experts(rank_expert_offset + e, recv_x) * recv_weights[:, k:k + 1], 0.0)
        out = Combine.apply(expert_out.to(torch.bfloat16), handle)
        (out.float() * grad_out).sum().backward()
        dense_x = mine.x.float().clone().requires_grad_(True)
        dense_w = mine.topk_weights.clone().requires_grad_(True)
        dense = torch.zeros(dense_x.shape)
        for k in range(NUM_TOPK):
            for e in range(NUM_EXPERTS):
                chosen = (mine.topk_idx[:, k] == e)[:, None]
                dense = dense + torch.where(chosen, experts(e, dense_x) * dense_w[:, k:k + 1], 0.0)
        (dense * grad_out).sum().backward()
        what = f"V2 training (expand={do_expand})"
        check_close(out, dense.detach(), what + " forward", seed)
        check_close(x.grad, dense_x.grad, what + " grad of x", seed)
        check_close(weights.grad, dense_w.grad, what + " grad of topk_weights", seed)
    buffer.destroy()


def test_deep_ep_v2_elastic_buffer():
    run_ranks(_elastic_body, WORLD)
