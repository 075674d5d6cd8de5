"""Dispatch/combine measurements inside the ranks, for `python -m ep_comm.bench`.

Per rank: build Buffers (kernels where available, else the reference), make seeded inputs (routed
by ep_comm.bench.routing), check correctness once, then time each requested (mode, op, dtype).
Every rank's (bytes, median, p99) is gathered to rank 0, which turns them into table rows (see
`aggregate`).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ep_comm import fp8
from ep_comm.bench import counting, routing
from ep_comm.bench.baseline import AllToAllBaseline, EmulatedBaseline
from ep_comm.bench.timing import Timer, Timing, copy_ceiling
from ep_comm.buffer import Buffer
from ep_comm.testing import (calc_diff, expected_combine, expected_dispatch, expected_low_latency_combine,
                             expected_low_latency_dispatch, make_inputs)

MODES = ("normal", "low_latency")
DTYPES = ("bf16", "fp8")


@dataclass
class Case:
    tokens: int          # normal-mode tokens per rank
    hidden: int
    topk: int
    experts: int
    ll_tokens: int       # low-latency tokens per rank (= num_max_dispatch_tokens_per_rank); 0: skip the mode
    routing: str = "uniform"   # see ep_comm.bench.routing

    def validate(self, world: int) -> None:
        if self.experts % world != 0:
            raise ValueError(f"--experts ({self.experts}) must be a multiple of --ranks ({world})")
        if not 0 < self.topk <= self.experts:
            raise ValueError(f"--topk must be in 1..experts ({self.experts}), got {self.topk}")
        if self.hidden % counting.FP8_BLOCK != 0:
            raise ValueError(f"--hidden must be a multiple of {counting.FP8_BLOCK} (FP8 scales), got {self.hidden}")
        if self.tokens < 0 or self.ll_tokens < 0 or self.tokens + self.ll_tokens == 0:
            raise ValueError(f"token counts must be >= 0 and not both 0, got {self.tokens} and {self.ll_tokens}")
        routing.check(routing.parse(self.routing), self.experts, self.topk, world)


@dataclass
class Options:
    modes: Sequence[str] = MODES
    dtypes: Sequence[str] = DTYPES
    iters: int = 10
    warmup: int = 2
    backend: str = "auto"          # auto | reference | kernels
    baseline: str = "none"         # none | auto | all_to_all | emulated
    flush_l2: bool = False
    check: bool = True
    seed: int = 20261123
    ceiling_bytes: int = 0         # 0: a size picked for the device
    graph: bool = False            # also time low-latency ops as CUDA-graph replays (GPU kernels only)


@dataclass
class Sample:
    """One rank's measurement of one (mode, op, dtype, impl)."""
    mode: str
    op: str
    dtype: str
    impl: str
    tokens: int
    recv_rows: int
    bytes: int
    median_s: float
    min_s: float
    p99_s: float = 0.0
    launch: str = "eager"       # eager | graph (a CUDA-graph replay)


# ---- pure helpers (unit tested) --------------------------------------------------------------------

def ranks_per_memory(world: int, device_type: str, device_count: int) -> int:
    """How many ranks share one memory system: all of them on a CPU host, round-robin over GPUs."""
    if device_type != "cuda" or device_count <= 0:
        return world
    return math.ceil(world / device_count)


def aggregate(samples: Sequence[Sample], ceiling_gbps: Optional[float], ranks_sharing: int) -> Dict[str, object]:
    """All ranks' samples of one measurement (one per rank, rank order) -> one table row.

    Times: each rank's median and p99 over its timed iterations; the row keeps the min and max of
    each over the ranks (median_us_min..median_us_max: how far the fastest and slowest rank differ).
    algbw: per rank, the token bytes it received / its median time (DeepEP's per-rank figure);
    algbw_gbps is the mean over ranks, _min/_max the extremes, algbw_total_gbps the sum.
    busbw_gbps (baseline rows only): algbw x (n-1)/n, nccl-tests' bus bandwidth of an all-to-all.
    recv_rows_max_over_mean: the busiest rank's received rows over the mean (1.0 = balanced).
    fraction_of_ceiling: see counting.fraction_of_ceiling, with the ranks that share a memory summed.
    """
    if not samples:
        raise ValueError("no samples to aggregate")
    first = samples[0]
    n = len(samples)
    per_rank = [counting.gbps(s.bytes, s.median_s) for s in samples]
    algbw = sum(per_rank) / n
    rows = [s.recv_rows for s in samples]
    mean_rows = sum(rows) / n
    name = f"{first.mode}/{first.op}/{first.dtype}/{first.impl}" + ("/graph" if first.launch == "graph" else "")
    row: Dict[str, object] = {
        "name": name,
        "mode": first.mode, "op": first.op, "dtype": first.dtype, "impl": first.impl, "launch": first.launch,
        "tokens": first.tokens, "ranks": n,
        "recv_rows_per_rank": mean_rows,
        "recv_rows_max": max(rows),
        "recv_rows_max_over_mean": max(rows) / mean_rows if mean_rows > 0 else None,
        "bytes_per_rank": sum(s.bytes for s in samples) / n,
        "bytes_max": max(s.bytes for s in samples),
        "median_us_min": 1e6 * min(s.median_s for s in samples),
        "median_us_max": 1e6 * max(s.median_s for s in samples),
        "p99_us_min": 1e6 * min(s.p99_s for s in samples),
        "p99_us_max": 1e6 * max(s.p99_s for s in samples),
        "algbw_gbps": algbw,
        "algbw_gbps_min": min(per_rank),
        "algbw_gbps_max": max(per_rank),
        "algbw_total_gbps": sum(per_rank),
        "busbw_gbps": counting.bus_bandwidth(algbw, n) if first.impl == "baseline" else None,
        "fraction_of_ceiling": (counting.fraction_of_ceiling(algbw * ranks_sharing, ceiling_gbps)
                                if ceiling_gbps else None),
    }
    return row


def _same_job(r: Dict[str, object]) -> tuple:
    return r["mode"], r["op"], r["dtype"], r["tokens"], r.get("hidden")


def attach_speedups(rows: List[Dict[str, object]]) -> None:
    """speedup = ep_comm algbw over the (eager) baseline's for the same (mode, op, dtype, tokens, hidden)."""
    baseline = {_same_job(r): r for r in rows if r["impl"] == "baseline"}
    for r in rows:
        if r["impl"] != "ep_comm":
            continue
        b = baseline.get(_same_job(r))
        r["speedup"] = (r["algbw_total_gbps"] / b["algbw_total_gbps"]) if b and b["algbw_total_gbps"] else None


# ---- in-rank environment ---------------------------------------------------------------------------

@dataclass
class Env:
    rank: int
    world: int
    group: dist.ProcessGroup
    backend_kind: str
    device: torch.device
    timer: Timer
    normal: Optional[Buffer]
    low_latency: Optional[Buffer]
    ranks_sharing: int
    ceiling: Optional[dict] = None
    resources: dict = field(default_factory=dict)
    graph_error: Optional[str] = None    # set once a CUDA-graph capture failed on any rank
    checks: List[dict] = field(default_factory=list)


def make_env(rank: int, world: int, group: dist.ProcessGroup, hidden: int, max_ll_tokens: int, experts: int,
             opts: Options) -> Env:
    normal = low_latency = None
    if "normal" in opts.modes:
        hidden_bytes = hidden * 2
        nvl = max(Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden_bytes, world),
                  Buffer.get_combine_config(world).get_nvl_buffer_size_hint(hidden_bytes, world))
        normal = Buffer(group, num_nvl_bytes=nvl, backend=opts.backend)
    if "low_latency" in opts.modes:
        rdma = Buffer.get_low_latency_rdma_size_hint(max_ll_tokens, hidden, world, experts)
        low_latency = Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, backend=opts.backend)
    any_buffer = normal or low_latency
    device = any_buffer.device
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    env = Env(rank, world, group, any_buffer.backend_kind, device, Timer(device, group, opts.flush_l2), normal,
              low_latency, ranks_per_memory(world, device.type, count))
    env.resources = resources(env, world)
    env.ceiling = measure_ceiling(env, opts.ceiling_bytes)
    return env


def resources(env: "Env", world: int) -> dict:
    """What a run occupies, per rank: SMs and communication-buffer bytes of each mode.

    normal: the kernels use Config.num_sms SMs (Buffer.get_dispatch_config/get_combine_config);
    low-latency: grids sized by the work, not bounded by a setting (num_sms None); the reference
    backend allocates no communication buffer and uses no SMs of ours (it calls all_to_all_single)."""
    kernels = env.backend_kind != "reference"
    device_sms = (torch.cuda.get_device_properties(env.device).multi_processor_count
                  if env.device.type == "cuda" else None)
    out: dict = {"device_sms": device_sms}
    if env.normal is not None:
        out["normal"] = {"num_sms": (max(Buffer.get_dispatch_config(world).num_sms,
                                         Buffer.get_combine_config(world).num_sms) if kernels else None),
                         "buffer_bytes": env.normal.num_nvl_bytes + env.normal.num_rdma_bytes,
                         "allocated": kernels}
    if env.low_latency is not None:
        out["low_latency"] = {"num_sms": None, "buffer_bytes": env.low_latency.num_nvl_bytes +
                              env.low_latency.num_rdma_bytes, "allocated": kernels}
    return out


def measure_ceiling(env: Env, num_bytes: int = 0) -> dict:
    """Rank 0 measures a local copy while the others wait; every rank gets the result."""
    num_bytes = num_bytes or (256 << 20 if env.device.type == "cuda" else 64 << 20)
    result = [None]
    dist.barrier(group=env.group)
    if env.rank == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)   # the host's whole copy rate, not one rank's share
        try:
            result[0] = copy_ceiling(env.device, num_bytes)
        finally:
            torch.set_num_threads(threads)
    dist.broadcast_object_list(result, src=0, group=env.group)
    return result[0]


def inputs_on(env: Env, seed: int, rank: int, tokens: int, case: Case):
    """Rank `rank`'s seeded inputs on env.device, its experts picked by case.routing."""
    inp = make_inputs(seed, rank, tokens, case.hidden, case.topk, case.experts, masked_fraction=0.0)
    idx = routing.topk_idx(routing.parse(case.routing), tokens, case.experts, case.topk, rank, env.world, seed)
    return type(inp)(inp.x.to(env.device), idx.to(env.device), inp.topk_weights.to(env.device))


def routing_summary(case: Case, world: int, seed: int) -> dict:
    """Imbalance of a case's routing over all ranks, from the very inputs the ranks timed: the
    normal-mode inputs (seed) for the expert counts and normal rows, the low-latency inputs
    (seed + 1, ll_tokens per rank) for the low-latency rows."""
    r = routing.parse(case.routing)

    def summary(tokens: int, s: int) -> dict:
        idx = [routing.topk_idx(r, tokens, case.experts, case.topk, rank, world, s) for rank in range(world)]
        return routing.imbalance(idx, case.experts, world)
    normal = summary(case.tokens, seed) if case.tokens > 0 else None
    low_latency = summary(case.ll_tokens, seed + 1) if case.ll_tokens > 0 else None
    out = dict(normal or low_latency)
    if normal is not None and low_latency is not None:
        out.update(low_latency_rows_per_rank=low_latency["low_latency_rows_per_rank"],
                   low_latency_rows=low_latency["low_latency_rows"])
    return dict(routing=str(r), tokens=case.tokens, ll_tokens=case.ll_tokens, hidden=case.hidden, **out)


def gather(env: Env, items: list) -> Optional[list]:
    """Every rank's list -> on rank 0 a list of lists (rank order); None elsewhere."""
    out = [None] * env.world
    dist.all_gather_object(out, items, group=env.group)
    return out if env.rank == 0 else None


# ---- ep_comm measurements ---------------------------------------------------------------------------

def _time(env: Env, opts: Options, fn: Callable, before: Optional[Callable] = None,
          after: Optional[Callable] = None) -> Timing:
    return env.timer.measure(fn, opts.iters, opts.warmup, before=before, after=after)


def _as_x(x: torch.Tensor, dtype: str):
    return fp8.per_token_cast_to_fp8(x) if dtype == "fp8" else x


def measure_normal(env: Env, case: Case, opts: Options) -> List[Sample]:
    buf = env.normal
    inp = inputs_on(env, opts.seed, env.rank, case.tokens, case)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.experts)
    kw = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
              num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)
    samples = []
    for dtype in opts.dtypes:
        x = _as_x(inp.x, dtype)
        rows = buf.dispatch(x, **kw)[4].num_recv_rows
        t = _time(env, opts, lambda: buf.dispatch(x, **kw))
        samples.append(Sample("normal", "dispatch", dtype, "ep_comm", case.tokens, rows,
                              counting.dispatch_bytes(rows, case.hidden, dtype), t.median_s, t.min_s, t.p99_s))
    recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, **kw)
    t = _time(env, opts, lambda: buf.combine(recv_x, handle))
    samples.append(Sample("normal", "combine", "bf16", "ep_comm", case.tokens, handle.num_recv_rows,
                          counting.combine_bytes(handle.num_recv_rows, case.hidden), t.median_s, t.min_s, t.p99_s))
    return samples


def measure_low_latency(env: Env, case: Case, opts: Options) -> List[Sample]:
    """Each timed dispatch is followed by an untimed combine of its handle and each timed combine is
    preceded by an untimed dispatch, so the buffers see the protocol's dispatch/combine pairs."""
    buf = env.low_latency
    T = case.ll_tokens
    inp = inputs_on(env, opts.seed + 1, env.rank, T, case)
    state: dict = {}

    def dispatch(use_fp8: bool) -> None:
        state["out"] = buf.low_latency_dispatch(inp.x, inp.topk_idx, T, case.experts, use_fp8=use_fp8)

    def combine_rows() -> torch.Tensor:
        recv_x = state["out"][0]
        if isinstance(recv_x, tuple):   # combine takes bf16 expert outputs: dequantize outside the timing
            state.setdefault("bf16_rows", torch.zeros(recv_x[0].shape, dtype=torch.bfloat16, device=env.device))
            return state["bf16_rows"]
        return recv_x

    def combine() -> None:
        buf.low_latency_combine(state["rows"], inp.topk_idx, inp.topk_weights, state["out"][2])

    def prepare_combine() -> None:
        state["rows"] = combine_rows()

    samples = []
    buf.clean_low_latency_buffer(T, case.hidden, case.experts)
    for dtype in opts.dtypes:
        use_fp8 = dtype == "fp8"
        dispatch(use_fp8)
        rows = int(state["out"][1].sum())
        prepare_combine()
        combine()
        t = _time(env, opts, lambda: dispatch(use_fp8), after=lambda: (prepare_combine(), combine()))
        samples.append(Sample("low_latency", "dispatch", dtype, "ep_comm", T, rows,
                              counting.dispatch_bytes(rows, case.hidden, dtype), t.median_s, t.min_s, t.p99_s))
    dispatch(False)
    rows = int(state["out"][1].sum())
    t = _time(env, opts, combine, before=lambda: (dispatch(False), prepare_combine()))
    samples.append(Sample("low_latency", "combine", "bf16", "ep_comm", T, rows,
                          counting.combine_bytes(rows, case.hidden), t.median_s, t.min_s, t.p99_s))
    if graphs_usable(env, opts):
        samples += measure_low_latency_graphs(env, case, opts, inp)
    return samples


def graphs_usable(env: Env, opts: Options) -> bool:
    return (opts.graph and env.device.type == "cuda" and env.backend_kind == "kernels"
            and env.graph_error is None)


def measure_low_latency_graphs(env: Env, case: Case, opts: Options, inp) -> List[Sample]:
    """The same ops as CUDA-graph replays, the way a decode step runs them: one graph holds a
    dispatch, another the combine of its handle; they are replayed in pairs like the eager calls.
    Normal mode is not captured: its dispatch needs host-side counts (or num_worst_tokens)."""
    buf = env.low_latency
    T = case.ll_tokens
    samples: List[Sample] = []
    for dtype in opts.dtypes:
        use_fp8 = dtype == "fp8"
        error, graphs, rows = None, None, 0
        try:
            state: dict = {}
            g_dispatch, g_combine = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            torch.cuda.synchronize(env.device)
            with torch.cuda.graph(g_dispatch):
                state["out"] = buf.low_latency_dispatch(inp.x, inp.topk_idx, T, case.experts, use_fp8=use_fp8)
            recv_x = state["out"][0]
            expert_rows = (torch.zeros(recv_x[0].shape, dtype=torch.bfloat16, device=env.device)
                           if isinstance(recv_x, tuple) else recv_x)
            with torch.cuda.graph(g_combine):
                buf.low_latency_combine(expert_rows, inp.topk_idx, inp.topk_weights, state["out"][2])
            graphs = (g_dispatch, g_combine, state)
        except Exception as e:  # a rank that cannot capture must not leave its peers replaying alone
            error = f"{type(e).__name__}: {e}"
        everyone = [None] * env.world
        dist.all_gather_object(everyone, error, group=env.group)
        failed = next((f"rank {r}: {e}" for r, e in enumerate(everyone) if e), None)
        if failed:
            # Every rank saw the same verdict, so all stop capturing together and keep their eager rows.
            env.graph_error = f"CUDA-graph capture of low_latency/{dtype} failed on {failed}"
            return samples
        g_dispatch, g_combine, state = graphs
        g_dispatch.replay()
        g_combine.replay()
        torch.cuda.synchronize(env.device)
        rows = int(state["out"][1].sum())
        t = _time(env, opts, g_dispatch.replay, after=g_combine.replay)
        samples.append(Sample("low_latency", "dispatch", dtype, "ep_comm", T, rows,
                              counting.dispatch_bytes(rows, case.hidden, dtype), t.median_s, t.min_s, t.p99_s,
                              "graph"))
        if dtype == "bf16" or len(opts.dtypes) == 1:
            t = _time(env, opts, g_combine.replay, before=g_dispatch.replay)
            samples.append(Sample("low_latency", "combine", "bf16", "ep_comm", T, rows,
                                  counting.combine_bytes(rows, case.hidden), t.median_s, t.min_s, t.p99_s, "graph"))
    return samples


# ---- baseline measurements --------------------------------------------------------------------------

def pick_baseline(requested: str, env: Env) -> str:
    """'all_to_all' where all_to_all_single can run one rank per device (gloo on CPU, NCCL with one
    GPU per rank), else 'emulated' (one GPU shared by the ranks)."""
    if requested != "auto":
        return requested
    if env.device.type != "cuda":
        return "all_to_all"
    return "all_to_all" if torch.cuda.device_count() >= env.world else "emulated"


def make_baseline_group(kind: str, env: Env):
    if kind != "all_to_all":
        return None
    if env.device.type == "cuda":
        return dist.new_group(list(range(env.world)), backend="nccl")
    return env.group


def measure_baseline_distributed(env: Env, case: Case, opts: Options, group) -> List[Sample]:
    base = AllToAllBaseline(group, exchange_on_host=(dist.get_backend(group) == "gloo" and env.device.type == "cuda"))
    samples = []
    if "normal" in opts.modes and case.tokens > 0:
        inp = inputs_on(env, opts.seed, env.rank, case.tokens, case)
        in_rank = env.normal.get_dispatch_layout(inp.topk_idx, case.experts)[3]
        for dtype in opts.dtypes:
            x = _as_x(inp.x, dtype)
            parts, st = base.dispatch(x, inp.topk_idx, inp.topk_weights, in_rank)
            rows = parts[0].shape[0]
            t = _time(env, opts, lambda: base.dispatch(x, inp.topk_idx, inp.topk_weights, in_rank))
            samples.append(Sample("normal", "dispatch", dtype, "baseline", case.tokens, rows,
                                  counting.dispatch_bytes(rows, case.hidden, dtype), t.median_s, t.min_s, t.p99_s))
        parts, st = base.dispatch(inp.x, inp.topk_idx, inp.topk_weights, in_rank)
        t = _time(env, opts, lambda: base.combine(parts[0], st))
        rows = parts[0].shape[0]
        samples.append(Sample("normal", "combine", "bf16", "baseline", case.tokens, rows,
                              counting.combine_bytes(rows, case.hidden), t.median_s, t.min_s, t.p99_s))
    if "low_latency" in opts.modes and case.ll_tokens > 0:
        T = case.ll_tokens
        inp = inputs_on(env, opts.seed + 1, env.rank, T, case)
        for dtype in opts.dtypes:
            use_fp8 = dtype == "fp8"
            data, counts, st = base.low_latency_dispatch(inp.x, inp.topk_idx, case.experts, use_fp8)
            rows = int(counts.sum())
            t = _time(env, opts, lambda: base.low_latency_dispatch(inp.x, inp.topk_idx, case.experts, use_fp8))
            samples.append(Sample("low_latency", "dispatch", dtype, "baseline", T, rows,
                                  counting.dispatch_bytes(rows, case.hidden, dtype), t.median_s, t.min_s, t.p99_s))
        data, counts, st = base.low_latency_dispatch(inp.x, inp.topk_idx, case.experts, False)
        t = _time(env, opts, lambda: base.low_latency_combine(data, inp.topk_weights, st))
        rows = int(counts.sum())
        samples.append(Sample("low_latency", "combine", "bf16", "baseline", T, rows,
                              counting.combine_bytes(rows, case.hidden), t.median_s, t.min_s, t.p99_s))
    return samples


def measure_baseline_emulated(env: Env, case: Case, opts: Options) -> List[Sample]:
    """Rank 0 runs every rank's share in one process; each rank is credited its own received rows
    and the whole job's time (the ranks would share the device during that time)."""
    samples: List[Sample] = []
    timer = Timer(env.device, None, opts.flush_l2)
    base = EmulatedBaseline(env.world)
    dist.barrier(group=env.group)
    if env.rank == 0:
        def credit(mode, op, dtype, tokens, rows_per_rank, t: Timing, row_dtype):
            for r, rows in enumerate(rows_per_rank):
                samples.append(Sample(mode, op, dtype, "baseline", tokens, rows,
                                      counting.dispatch_bytes(rows, case.hidden, row_dtype), t.median_s, t.min_s, t.p99_s))

        if "normal" in opts.modes and case.tokens > 0:
            ins = [inputs_on(env, opts.seed, r, case.tokens, case) for r in range(env.world)]
            in_rank = [env.normal.get_dispatch_layout(i.topk_idx, case.experts)[3] for i in ins]
            for dtype in opts.dtypes:
                xs = [_as_x(i.x, dtype) for i in ins]
                received, orders = base.dispatch(xs, in_rank)
                t = timer.measure(lambda: base.dispatch(xs, in_rank), opts.iters, opts.warmup)
                credit("normal", "dispatch", dtype, case.tokens, [r[0].shape[0] for r in received], t, dtype)
            received, orders = base.dispatch([i.x for i in ins], in_rank)
            rows = [r[0] for r in received]
            t = timer.measure(lambda: base.combine(rows, orders, [case.tokens] * env.world), opts.iters, opts.warmup)
            credit("normal", "combine", "bf16", case.tokens, [r.shape[0] for r in rows], t, "bf16")
        if "low_latency" in opts.modes and case.ll_tokens > 0:
            T = case.ll_tokens
            ins = [inputs_on(env, opts.seed + 1, r, T, case) for r in range(env.world)]
            xs, idx, ws = [i.x for i in ins], [i.topk_idx for i in ins], [i.topk_weights for i in ins]
            for dtype in opts.dtypes:
                use_fp8 = dtype == "fp8"
                received, states = base.low_latency_dispatch(xs, idx, case.experts, use_fp8)
                t = timer.measure(lambda: base.low_latency_dispatch(xs, idx, case.experts, use_fp8),
                                  opts.iters, opts.warmup)
                credit("low_latency", "dispatch", dtype, T, [r[0].shape[0] for r in received], t, dtype)
            received, states = base.low_latency_dispatch(xs, idx, case.experts, False)
            rows = [r[0] for r in received]
            t = timer.measure(lambda: base.low_latency_combine(rows, ws, states, case.experts), opts.iters, opts.warmup)
            credit("low_latency", "combine", "bf16", T, [r.shape[0] for r in rows], t, "bf16")
    dist.barrier(group=env.group)
    # Hand rank r its own samples so gathering works the same way as for the distributed baseline.
    per_rank = [samples[r::env.world] for r in range(env.world)] if env.rank == 0 else None
    box = [per_rank]
    dist.broadcast_object_list(box, src=0, group=env.group)
    return box[0][env.rank]


# ---- correctness --------------------------------------------------------------------------------------

def _check(name: str, fn: Callable[[], Optional[str]]) -> dict:
    """fn returns None when fine, else what went wrong; exceptions count as failures."""
    try:
        problem = fn()
    except Exception as e:  # report it; a benchmark should say what failed rather than die silently
        problem = f"{type(e).__name__}: {e}"
    return {"name": name, "ok": problem is None, "detail": problem or ""}


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> Optional[str]:
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape:
        return f"{what}: shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    if not torch.equal(a, b):
        return f"{what}: values differ (calc_diff {calc_diff(a.float(), b.float()):.3g})"
    return None


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> Optional[str]:
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape:
        return f"{what}: shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    diff = calc_diff(a.float(), b.float())
    return None if diff <= tol else f"{what}: calc_diff {diff:.3g} > {tol:g}"


def _first(*problems: Optional[str]) -> Optional[str]:
    return next((p for p in problems if p), None)


def check_with_emulator(env: Env, case: Case, opts: Options, tokens: int = 12, hidden: int = 256) -> List[dict]:
    """Small case against ep_comm.testing's loop emulator (used where the backend is the reference)."""
    small = Case(tokens, min(hidden, case.hidden), case.topk, case.experts, tokens)
    seed = opts.seed + 99
    inputs = [make_inputs(seed, r, tokens + r, small.hidden, small.topk, small.experts) for r in range(env.world)]
    mine = inputs[env.rank]
    checks = []
    if env.normal is not None:
        buf = env.normal
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(mine.topk_idx, small.experts)
        kw = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                  num_tokens_per_expert=per_expert, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)
        all_expected = [expected_dispatch(inputs, d, small.experts) for d in range(env.world)]
        expected = all_expected[env.rank]
        for dtype in opts.dtypes:
            def normal_dispatch(dtype=dtype):
                out = buf.dispatch(_as_x(mine.x, dtype), **kw)
                if dtype == "fp8":
                    want = fp8.per_token_cast_to_fp8(expected.recv_x)
                    problem = _first(_equal(out[0][0], want[0], "fp8 payload"), _equal(out[0][1], want[1], "scales"))
                else:
                    problem = _equal(out[0], expected.recv_x, "recv_x")
                if problem is None and out[3] != expected.num_recv_tokens_per_expert:
                    problem = f"tokens per expert {out[3]} != {expected.num_recv_tokens_per_expert}"
                return problem
            checks.append(_check(f"normal/dispatch/{dtype}", normal_dispatch))

        def normal_combine():
            recv_x, _, _, _, handle, _ = buf.dispatch(mine.x, **kw)
            combined = buf.combine(recv_x, handle)[0]
            want = expected_combine(all_expected, [e.recv_x for e in all_expected], env.rank, mine.x.shape[0])
            return _equal(combined, want, "combined_x")
        checks.append(_check("normal/combine/bf16", normal_combine))
    if env.low_latency is not None:
        buf = env.low_latency
        T = max(i.x.shape[0] for i in inputs)
        expected = expected_low_latency_dispatch(inputs, env.rank, small.experts)
        buf.clean_low_latency_buffer(T, small.hidden, small.experts)
        for dtype in opts.dtypes:
            def ll_dispatch(dtype=dtype):
                recv_x, count, handle, _, _ = buf.low_latency_dispatch(mine.x, mine.topk_idx, T, small.experts,
                                                                       use_fp8=dtype == "fp8")
                if count.tolist() != expected.recv_count:
                    return f"recv_count {count.tolist()} != {expected.recv_count}"
                casts = [fp8.per_token_cast_to_fp8(i.x) for i in inputs] if dtype == "fp8" else None
                for e, sources in enumerate(expected.rows):
                    for j, (src, t) in enumerate(sources):
                        got, want = ((recv_x[0][e, j], casts[src][0][t]) if casts else (recv_x[e, j], inputs[src].x[t]))
                        problem = _equal(got, want, f"expert {e} row {j}")
                        if problem:
                            return problem
                buf.low_latency_combine(recv_x if not casts else torch.zeros(recv_x[0].shape, dtype=torch.bfloat16),
                                        mine.topk_idx, mine.topk_weights, handle)
                return None
            checks.append(_check(f"low_latency/dispatch/{dtype}", ll_dispatch))

        def ll_combine():
            recv_x, _, handle, _, _ = buf.low_latency_dispatch(mine.x, mine.topk_idx, T, small.experts, use_fp8=False)
            combined = buf.low_latency_combine(recv_x, mine.topk_idx, mine.topk_weights, handle)[0]
            want = expected_low_latency_combine(mine, lambda e, s, t: inputs[s].x[t], env.rank, small.experts,
                                                env.world)
            return _equal(combined, want, "combined_x")
        checks.append(_check("low_latency/combine/bf16", ll_combine))
    return checks


def check_against_reference(env: Env, case: Case, opts: Options, tokens: int = 64) -> List[dict]:
    """Kernels vs Buffer(backend='reference') on the same inputs: copies bit for bit, reductions by calc_diff."""
    ref = Buffer(env.group, low_latency_mode=True, backend="reference")
    small = Case(min(case.tokens, tokens) or 1, case.hidden, case.topk, case.experts,
                 min(case.ll_tokens, tokens) or 1)
    seed = opts.seed + 77
    mine = inputs_on(env, seed, env.rank, small.tokens, small)
    checks = []
    if env.normal is not None:
        buf = env.normal

        def run(b: Buffer, x):
            layout = b.get_dispatch_layout(mine.topk_idx, small.experts)
            return b.dispatch(x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                              is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=mine.topk_idx,
                              topk_weights=mine.topk_weights)
        for dtype in opts.dtypes:
            def normal_dispatch(dtype=dtype):
                x = _as_x(mine.x, dtype)
                got, want = run(buf, x), run(ref, x)
                if dtype == "fp8":
                    p = _first(_equal(got[0][0], want[0][0], "fp8 payload"), _equal(got[0][1], want[0][1], "scales"))
                else:
                    p = _equal(got[0], want[0], "recv_x")
                return _first(p, _equal(got[1], want[1], "recv_topk_idx"),
                              None if got[3] == want[3] else f"tokens per expert {got[3]} != {want[3]}")
            checks.append(_check(f"normal/dispatch/{dtype}", normal_dispatch))

        def normal_combine():
            got_d, want_d = run(buf, mine.x), run(ref, mine.x)
            got = buf.combine(got_d[0], got_d[4])[0]
            want = ref.combine(want_d[0], want_d[4])[0]
            return _close(got, want, "combined_x", 1e-5)
        checks.append(_check("normal/combine/bf16", normal_combine))
    if env.low_latency is not None:
        buf = env.low_latency
        T = small.ll_tokens
        x, idx, w = mine.x[:T], mine.topk_idx[:T], mine.topk_weights[:T]
        buf.clean_low_latency_buffer(T, small.hidden, small.experts)
        for dtype in opts.dtypes:
            def ll_dispatch(dtype=dtype):
                use_fp8 = dtype == "fp8"
                got = buf.low_latency_dispatch(x, idx, T, small.experts, use_fp8=use_fp8)
                want = ref.low_latency_dispatch(x, idx, T, small.experts, use_fp8=use_fp8)
                p = _equal(got[1], want[1], "recv_count")
                if p:
                    return p
                # Within an expert, rows of one source may come in another order: compare order-free sums.
                for e, n in enumerate(want[1].tolist()):
                    if use_fp8:
                        g = got[0][0][e, :n].float().double().sum(0), got[0][1][e, :n].double().sum(0)
                        r = want[0][0][e, :n].float().double().sum(0), want[0][1][e, :n].double().sum(0)
                        p = _first(_close(g[0], r[0], f"expert {e} payload sum", 1e-12),
                                   _close(g[1], r[1], f"expert {e} scale sum", 1e-12))
                    else:
                        p = _close(got[0][e, :n].double().sum(0), want[0][e, :n].double().sum(0),
                                   f"expert {e} row sum", 1e-12)
                    if p:
                        return p
                rows = got[0] if not use_fp8 else torch.zeros(got[0][0].shape, dtype=torch.bfloat16, device=x.device)
                buf.low_latency_combine(rows, idx, w, got[2])
                return None
            checks.append(_check(f"low_latency/dispatch/{dtype}", ll_dispatch))

        def ll_combine():
            got_d = buf.low_latency_dispatch(x, idx, T, small.experts, use_fp8=False)
            want_d = ref.low_latency_dispatch(x, idx, T, small.experts, use_fp8=False)
            got = buf.low_latency_combine(got_d[0], idx, w, got_d[2])[0]
            want = ref.low_latency_combine(want_d[0], idx, w, want_d[2])[0]
            return _close(got, want, "combined_x", 1e-5)
        checks.append(_check("low_latency/combine/bf16", ll_combine))
    ref.destroy()
    return checks


def _ep_outputs(env: Env, case: Case, seed: int) -> dict:
    """ep_comm's outputs on a small case, for comparing the baseline with (CPU tensors)."""
    out = {}
    if env.normal is not None and case.tokens > 0:
        inp = inputs_on(env, seed, env.rank, case.tokens, case)
        layout = env.normal.get_dispatch_layout(inp.topk_idx, case.experts)
        recv_x, _, _, _, handle, _ = env.normal.dispatch(
            inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)
        out["normal_recv_x"] = recv_x.cpu()
        out["normal_combined"] = env.normal.combine(recv_x, handle)[0].cpu()
    if env.low_latency is not None and case.ll_tokens > 0:
        T = case.ll_tokens
        inp = inputs_on(env, seed + 1, env.rank, T, case)
        env.low_latency.clean_low_latency_buffer(T, case.hidden, case.experts)
        recv_x, count, handle, _, _ = env.low_latency.low_latency_dispatch(inp.x, inp.topk_idx, T, case.experts,
                                                                           use_fp8=False)
        out["ll_rows"] = torch.cat([recv_x[e, :n] for e, n in enumerate(count.tolist())]).cpu()
        out["ll_count"] = count.cpu()
        out["ll_combined"] = env.low_latency.low_latency_combine(recv_x, inp.topk_idx, inp.topk_weights,
                                                                  handle)[0].cpu()
    return out


def check_baseline(env: Env, case: Case, opts: Options, kind: str, group) -> List[dict]:
    """The baseline must do the same job: same received rows (bit for bit), same reductions (calc_diff)."""
    small = Case(min(case.tokens, 32), case.hidden, case.topk, case.experts, min(case.ll_tokens, 32))
    seed = opts.seed + 55
    ep = _ep_outputs(env, small, seed)
    got: dict = {}
    if kind == "all_to_all":
        base = AllToAllBaseline(group, exchange_on_host=(dist.get_backend(group) == "gloo"
                                                         and env.device.type == "cuda"))
        if "normal_recv_x" in ep:
            inp = inputs_on(env, seed, env.rank, small.tokens, small)
            in_rank = env.normal.get_dispatch_layout(inp.topk_idx, small.experts)[3]
            parts, st = base.dispatch(inp.x, inp.topk_idx, inp.topk_weights, in_rank)
            got["normal_recv_x"] = parts[0].cpu()
            got["normal_combined"] = base.combine(parts[0], st).cpu()
        if "ll_rows" in ep:
            inp = inputs_on(env, seed + 1, env.rank, small.ll_tokens, small)
            rows, counts, st = base.low_latency_dispatch(inp.x, inp.topk_idx, small.experts, False)
            got.update(ll_rows=rows.cpu(), ll_count=counts.to(torch.int32).cpu(),
                       ll_combined=base.low_latency_combine(rows, inp.topk_weights, st).cpu())
        mine = [(k, got[k], ep[k]) for k in ep]
    else:  # emulated: rank 0 holds every rank's share
        everyone = gather(env, [ep])
        mine = []
        if env.rank == 0:
            base = EmulatedBaseline(env.world)
            if "normal_recv_x" in ep:
                ins = [inputs_on(env, seed, r, small.tokens, small) for r in range(env.world)]
                in_rank = [env.normal.get_dispatch_layout(i.topk_idx, small.experts)[3] for i in ins]
                received, orders = base.dispatch([i.x for i in ins], in_rank)
                combined = base.combine([r[0] for r in received], orders, [small.tokens] * env.world)
                for r in range(env.world):
                    mine += [("normal_recv_x", received[r][0].cpu(), everyone[r][0]["normal_recv_x"]),
                             ("normal_combined", combined[r].cpu(), everyone[r][0]["normal_combined"])]
            if "ll_rows" in ep:
                ins = [inputs_on(env, seed + 1, r, small.ll_tokens, small) for r in range(env.world)]
                received, states = base.low_latency_dispatch([i.x for i in ins], [i.topk_idx for i in ins],
                                                             small.experts, False)
                combined = base.low_latency_combine([r[0] for r in received], [i.topk_weights for i in ins], states,
                                                    small.experts)
                for r in range(env.world):
                    mine += [("ll_rows", received[r][0].cpu(), everyone[r][0]["ll_rows"]),
                             ("ll_combined", combined[r].cpu(), everyone[r][0]["ll_combined"])]
    checks = []
    for name, value, want in mine:
        exact = name in ("normal_recv_x", "ll_rows", "ll_count")
        checks.append(_check(f"baseline/{name}", lambda v=value, w=want, n=name, e=exact:
                             _equal(v, w, n) if e else _close(v, w, n, 1e-5)))
    # Merge repeated names (emulated: one per rank) into one entry per name.
    merged: Dict[str, dict] = {}
    for c in checks:
        m = merged.setdefault(c["name"], {"name": c["name"], "ok": True, "detail": "",
                                          "how": f"{kind} baseline against ep_comm on the same inputs"})
        if not c["ok"]:
            m["ok"] = False
            m["detail"] = (m["detail"] + "; " if m["detail"] else "") + c["detail"]
    return list(merged.values())


def run_checks(env: Env, case: Case, opts: Options, extra: Optional[Callable[[], List[dict]]] = None) -> List[dict]:
    """Run the checks fitting the backend (plus `extra`); on rank 0 one entry per check, failing ranks named."""
    if env.backend_kind == "reference":
        mine = check_with_emulator(env, case, opts)
        how = "against the ep_comm.testing emulator (12+rank tokens x 256 hidden)"
    else:
        mine = check_against_reference(env, case, opts)
        how = "kernels against Buffer(backend='reference') on the same inputs"
    if extra is not None:
        mine += extra()
    everyone = gather(env, mine)
    if everyone is None:
        return []
    merged: Dict[str, dict] = {}
    for r, checks in enumerate(everyone):
        for c in checks:
            m = merged.setdefault(c["name"], {"name": c["name"], "ok": True, "how": c.get("how", how), "detail": ""})
            if not c["ok"]:
                m["ok"] = False
                m["detail"] += ("; " if m["detail"] else "") + f"rank {r}: {c['detail']}"
    return list(merged.values())


def sample_dicts(samples: Sequence[Sample]) -> List[dict]:
    return [asdict(s) for s in samples]


# ---- the rank body both CLIs run ------------------------------------------------------------------------

def bench_body(rank: int, world: int, group: dist.ProcessGroup, cases: List[dict], opts: dict,
               progress: bool = False) -> Optional[dict]:
    """Spawned once: build buffers, check, then measure every case (and the baseline if asked).
    Returns on rank 0 {'backend', 'baseline', 'ceiling', 'checks', 'rows', 'routing', 'resources',
    'graph'}; None elsewhere."""
    from ep_comm.bench.report import Progress
    options = Options(**opts)
    cases_ = [Case(**c) for c in cases]
    for c in cases_:
        c.validate(world)
    first = cases_[0]
    env = make_env(rank, world, group, max(c.hidden for c in cases_), max(1, max(c.ll_tokens for c in cases_)),
                   first.experts, options)
    baseline_kind = pick_baseline(options.baseline, env) if options.baseline != "none" else "none"
    baseline_group = make_baseline_group(baseline_kind, env)
    extra = None
    if baseline_kind != "none":
        extra = lambda: check_baseline(env, first, options, baseline_kind, baseline_group)  # noqa: E731
    checks = run_checks(env, first, options, extra) if options.check else []
    steps = [(case, part) for case in cases_ for part in ("normal", "low_latency", "baseline")
             if (part == "baseline" and baseline_kind != "none")
             or (part in options.modes and (case.tokens if part == "normal" else case.ll_tokens) > 0)]
    bar = Progress(len(steps), "ep_comm.bench", enabled=None if progress else False) if rank == 0 else None
    rows: List[dict] = []
    summaries: List[dict] = []
    for case in cases_:
        samples: List[Sample] = []
        for step_case, part in steps:
            if step_case is not case:
                continue
            if part == "normal":
                samples += measure_normal(env, case, options)
            elif part == "low_latency":
                samples += measure_low_latency(env, case, options)
            elif baseline_kind == "all_to_all":
                samples += measure_baseline_distributed(env, case, options, baseline_group)
            else:
                samples += measure_baseline_emulated(env, case, options)
            if bar is not None:
                bar.update(f"tokens={case.tokens} hidden={case.hidden} {part}")
        everyone = gather(env, samples)
        if everyone is not None:
            ceiling = env.ceiling["gbps"] if env.ceiling else None
            case_rows = []
            for i in range(len(everyone[0])):
                row = aggregate([per_rank[i] for per_rank in everyone], ceiling, env.ranks_sharing)
                row.update(hidden=case.hidden, topk=case.topk, experts=case.experts, routing=case.routing)
                case_rows.append(row)
            if baseline_kind != "none":
                attach_speedups(case_rows)
            rows += case_rows
            summaries.append(routing_summary(case, world, options.seed))
    if bar is not None:
        bar.close()
    if rank != 0:
        return None
    if not options.graph:
        graph = None
    elif env.graph_error is not None:
        graph = "failed: " + env.graph_error
    elif graphs_usable(env, options):
        graph = "measured"
    else:
        graph = ("skipped: CUDA graphs need the GPU kernels (this run uses the " + env.backend_kind + " backend on " +
                 env.device.type + ")")
    return {"backend": env.backend_kind, "baseline": baseline_kind, "ceiling": env.ceiling, "checks": checks,
            "rows": rows, "ranks_sharing_memory": env.ranks_sharing, "routing": summaries,
            "resources": env.resources, "graph": graph}
