"""Benchmarks: byte counting, routing generators, statistics, report formats and the baselines on
CPU -- never timings -- plus smoke runs of `python -m ep_comm.bench` (one case, a sweep, the
interconnect subcommand) at tiny sizes."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from ep_comm import fp8
from ep_comm.bench import counting, routing
from ep_comm.bench.baseline import EmulatedBaseline
from ep_comm.bench.ep import Sample, aggregate, attach_speedups, ranks_per_memory
from ep_comm.bench.report import (SCHEMA, Progress, make_meta, make_report, render_table, validate_report,
                                  write_json)
from ep_comm.bench.timing import Timer, percentile
from ep_comm.testing import (calc_diff, expected_combine, expected_dispatch, expected_low_latency_combine,
                             expected_low_latency_dispatch, make_inputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261124


# ---- byte counting -------------------------------------------------------------------------------------

def test_row_bytes():
    assert counting.row_bytes(7168, "bf16") == 14336
    assert counting.row_bytes(7168, "fp8") == 7168 + 56 * 4      # payload + one float32 scale per 128
    assert counting.row_bytes(128, "fp8") == 132
    with pytest.raises(ValueError, match="multiple of 128"):
        counting.row_bytes(100, "fp8")
    with pytest.raises(ValueError, match="dtype"):
        counting.row_bytes(128, "fp16")
    with pytest.raises(ValueError, match="positive"):
        counting.row_bytes(0, "bf16")


def test_dispatch_and_combine_bytes():
    assert counting.dispatch_bytes(10, 256, "bf16") == 10 * 512
    assert counting.dispatch_bytes(10, 256, "fp8") == 10 * (256 + 8)
    assert counting.dispatch_bytes(0, 256, "fp8") == 0
    assert counting.combine_bytes(10, 256) == counting.dispatch_bytes(10, 256, "bf16")
    with pytest.raises(ValueError):
        counting.dispatch_bytes(-1, 256, "bf16")
    # DeepEP's fp8 factor: fp8 bytes = bf16 bytes x (1 + 4/128) / 2
    assert counting.dispatch_bytes(3, 7168, "fp8") == counting.dispatch_bytes(3, 7168, "bf16") * (1 + 4 / 128) / 2


@pytest.mark.parametrize("world", [1, 3, 4])
def test_recv_rows_match_the_emulator(world):
    num_experts, hidden = 4 * world, 128
    inputs = [make_inputs(SEED, r, 9 + r, hidden, 3, num_experts) for r in range(world)]
    per_rank = num_experts // world
    dest_ranks = [[e // per_rank for e in row if e >= 0] for inp in inputs for row in inp.topk_idx.tolist()]
    experts = [row for inp in inputs for row in inp.topk_idx.tolist()]
    for rank in range(world):
        assert counting.normal_recv_rows(dest_ranks, rank) == expected_dispatch(inputs, rank, num_experts).recv_x.shape[0]
        assert counting.low_latency_recv_rows(experts, rank, per_rank) == \
            sum(expected_low_latency_dispatch(inputs, rank, num_experts).recv_count)


def test_bandwidth_helpers():
    assert counting.gbps(2e9, 0.5) == 4.0
    assert counting.gbps(1, 0) == 0.0
    assert counting.bus_bandwidth(8.0, 4) == 6.0
    assert counting.bus_bandwidth(8.0, 1) == 0.0
    assert counting.copy_bytes(5) == 10
    # 4 ranks sharing a memory each receiving 100 GB/s = 800 GB/s of read+write vs a 1600 GB/s copy.
    assert counting.fraction_of_ceiling(400.0, 1600.0) == 0.5
    assert counting.fraction_of_ceiling(1.0, 0.0) == 0.0


def test_sweeps():
    assert counting.message_sizes(4096, 1 << 14) == [4096, 8192, 16384]
    assert counting.message_sizes(3000, 5000) == [4096]
    assert counting.token_sweep(1, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert counting.token_sweep(1, 100)[-2:] == [64, 100]
    with pytest.raises(ValueError):
        counting.message_sizes(0, 10)


def test_aggregate_and_speedup():
    samples = [Sample("normal", "dispatch", "bf16", "ep_comm", 8, 10, 1_000_000, 0.001, 0.0009, 0.0015),
               Sample("normal", "dispatch", "bf16", "ep_comm", 8, 30, 3_000_000, 0.002, 0.0019, 0.004)]
    row = aggregate(samples, ceiling_gbps=100.0, ranks_sharing=2)
    assert row["name"] == "normal/dispatch/bf16/ep_comm" and row["ranks"] == 2 and row["launch"] == "eager"
    assert row["recv_rows_per_rank"] == 20 and row["bytes_per_rank"] == 2_000_000
    assert row["recv_rows_max"] == 30 and row["recv_rows_max_over_mean"] == pytest.approx(1.5)
    # algbw: each rank's bytes over its own median, then the mean over ranks (DeepEP's per-rank figure)
    assert row["algbw_gbps"] == pytest.approx((1.0 + 1.5) / 2)
    assert (row["algbw_gbps_min"], row["algbw_gbps_max"]) == (pytest.approx(1.0), pytest.approx(1.5))
    assert row["algbw_total_gbps"] == pytest.approx(2.5)
    assert (row["median_us_min"], row["median_us_max"]) == (pytest.approx(1000), pytest.approx(2000))
    assert (row["p99_us_min"], row["p99_us_max"]) == (pytest.approx(1500), pytest.approx(4000))
    assert row["busbw_gbps"] is None                      # bus bandwidth is the baseline's (all-to-all) figure
    assert row["fraction_of_ceiling"] == pytest.approx(2 * 1.25 * 2 / 100)
    assert aggregate(samples, None, 2)["fraction_of_ceiling"] is None
    base_samples = [Sample(*(s.mode, s.op, s.dtype, "baseline", s.tokens, s.recv_rows, s.bytes, 2 * s.median_s,
                             s.min_s, s.p99_s)) for s in samples]
    base = aggregate(base_samples, None, 2)
    assert base["busbw_gbps"] == pytest.approx(base["algbw_gbps"] * (2 - 1) / 2)
    graph = aggregate([Sample(*(s.mode, s.op, s.dtype, "ep_comm", s.tokens, s.recv_rows, s.bytes, s.median_s,
                                s.min_s, s.p99_s, "graph")) for s in samples], None, 2)
    assert graph["name"].endswith("/graph") and graph["launch"] == "graph"
    rows = [row, base, graph]
    for r in rows:
        r["hidden"] = 256
    attach_speedups(rows)
    assert row["speedup"] == pytest.approx(2.0) and graph["speedup"] == pytest.approx(2.0) and "speedup" not in base
    other_hidden = dict(row, hidden=512)
    attach_speedups([other_hidden, base])
    assert other_hidden["speedup"] is None                # a speedup compares the same job only
    assert ranks_per_memory(4, "cpu", 0) == 4
    assert ranks_per_memory(4, "cuda", 1) == 4
    assert ranks_per_memory(8, "cuda", 8) == 1
    assert ranks_per_memory(5, "cuda", 2) == 3


def test_percentile():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)      # between the largest two
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0 and percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([], 99)


def test_timer_counts_iterations_on_cpu():
    calls = []
    timing = Timer(torch.device("cpu")).measure(lambda: calls.append(1), iters=3, warmup=2,
                                                before=lambda: calls.append(0))
    assert timing.iters == 3 and len(calls) == 10 and timing.min_s <= timing.median_s <= timing.p99_s <= timing.max_s
    with pytest.raises(ValueError):
        Timer(torch.device("cpu")).measure(lambda: None, iters=0, warmup=0)


# ---- routing ---------------------------------------------------------------------------------------------

def _route(spec, tokens=256, experts=64, topk=8, world=4, seed=SEED):
    r = routing.parse(spec)
    return [routing.topk_idx(r, tokens, experts, topk, rank, world, seed) for rank in range(world)]


def test_routing_parse():
    assert str(routing.parse("uniform")) == "uniform"
    assert str(routing.parse("zipf:1.2")) == "zipf:1.2" and routing.parse("zipf:0").param == 0
    assert str(routing.parse("hot:4")) == "hot:4"
    assert str(routing.parse("incast")) == "incast:0" and routing.parse("incast:3").param == 3
    for bad in ("zipf", "zipf:-1", "zipf:x", "hot", "hot:0", "hot:1.5", "incast:x", "uniform:2", "random"):
        with pytest.raises(ValueError):
            routing.parse(bad)


@pytest.mark.parametrize("spec", ["uniform", "zipf:1.2", "hot:3", "hot:12", "incast:1"])
def test_routing_keeps_experts_distinct_and_is_seeded(spec):
    idx = _route(spec)
    for t in idx:
        assert t.dtype == torch.int64 and t.shape == (256, 8)
        assert bool((t >= 0).all()) and bool((t < 64).all())
        ordered = t.sort(dim=1).values
        assert bool((ordered[:, 1:] != ordered[:, :-1]).all()), f"{spec}: a token repeats an expert"
    again = _route(spec)
    assert all(torch.equal(a, b) for a, b in zip(idx, again))          # same seed, same routing
    assert not torch.equal(idx[0], idx[2])                              # ranks draw their own tokens
    assert not all(torch.equal(a, b) for a, b in zip(idx, _route(spec, seed=SEED + 1)))


def test_zipf_skew_raises_max_over_mean():
    skew = {spec: routing.imbalance(_route(spec, tokens=512), 64, 4) for spec in ("uniform", "zipf:0.6", "zipf:1.5")}
    expert = {k: v["tokens_per_expert"]["max_over_mean"] for k, v in skew.items()}
    assert expert["uniform"] < 1.5 < expert["zipf:0.6"] < expert["zipf:1.5"]
    ll = {k: v["low_latency_rows_per_rank"]["max_over_mean"] for k, v in skew.items()}
    assert ll["uniform"] < 1.1 < ll["zipf:1.5"]
    assert skew["zipf:1.5"]["tokens_per_expert"]["top5pct_share"] > 3 * skew["uniform"]["tokens_per_expert"]["top5pct_share"]
    # zipf:0 is uniform popularity
    assert routing.popularity(routing.parse("zipf:0"), 64, SEED).unique().tolist() == [1.0]


def test_hot_concentrates_on_k_experts():
    r = routing.parse("hot:3")
    hot = set(routing.hot_experts(r, 64, SEED).tolist())
    assert len(hot) == 3
    for t in _route("hot:3"):       # K < topk: every token takes all K hot experts
        assert all(hot <= set(row) for row in t.tolist())
    r12 = routing.parse("hot:12")
    hot12 = set(routing.hot_experts(r12, 64, SEED).tolist())
    idx = _route("hot:12")          # K >= topk: every selection is a hot expert
    assert all(set(row) <= hot12 for t in idx for row in t.tolist())
    summary = routing.imbalance(idx, 64, 4)
    assert summary["tokens_per_expert"]["idle"] == 64 - 12
    with pytest.raises(ValueError, match="at most 64"):
        _route("hot:65")


def test_incast_sends_everything_to_one_rank():
    idx = _route("incast:2", topk=8, experts=64, world=4)
    summary = routing.imbalance(idx, 64, 4)
    assert summary["normal_rows"] == [0, 0, 4 * 256, 0]
    assert summary["low_latency_rows"] == [0, 0, 4 * 256 * 8, 0]
    assert summary["normal_rows_per_rank"]["max_over_mean"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="do not fit"):
        _route("incast", topk=8, experts=16, world=4)       # 4 experts per rank < topk 8
    with pytest.raises(ValueError, match="names a rank"):
        _route("incast:4")


def test_uniform_imbalance_matches_counting():
    idx = _route("uniform", tokens=64, experts=16, topk=4, world=4)
    summary = routing.imbalance(idx, 16, 4)
    dest = [[e // 4 for e in row] for t in idx for row in t.tolist()]
    experts = [row for t in idx for row in t.tolist()]
    for rank in range(4):
        assert summary["normal_rows"][rank] == counting.normal_recv_rows(dest, rank)
        assert summary["low_latency_rows"][rank] == counting.low_latency_recv_rows(experts, rank, 4)
    assert sum(summary["low_latency_rows"]) == 4 * 64 * 4
    assert "max/mean" in routing.describe(summary)


def test_model_presets_and_cases():
    from ep_comm.bench.__main__ import defaults, hidden_sweep, make_cases, parser
    args = defaults(parser().parse_args(["--model", "deepseek-v3"]), on_gpu=False)
    assert (args.hidden, args.topk, args.experts) == (7168, 8, 256) and args.tokens == 128
    args = defaults(parser().parse_args(["--model", "qwen3-235b-a22b", "--topk", "2"]), on_gpu=False)
    assert (args.hidden, args.topk, args.experts) == (4096, 2, 128)       # explicit options win
    for name, m in routing.MODELS.items():
        assert m["source"] and m["hidden"] % 128 == 0 and m["topk"] <= m["experts"], name
    assert hidden_sweep(1024) == [128, 256, 512, 1024] and hidden_sweep(7168)[-2:] == [4096, 7168]
    args = defaults(parser().parse_args(["--sweep", "tokens", "--tokens", "8", "--ll-tokens", "4",
                                         "--routing", "zipf:1"]), on_gpu=False)
    cases = make_cases(args)
    assert [(c.tokens, c.ll_tokens, c.routing) for c in cases] == [(1, 1, "zipf:1"), (2, 2, "zipf:1"),
                                                                   (4, 4, "zipf:1"), (8, 0, "zipf:1")]
    args = defaults(parser().parse_args(["--sweep", "bytes", "--hidden", "512"]), on_gpu=False)
    assert [c.hidden for c in make_cases(args)] == [128, 256, 512]
    with pytest.raises(SystemExit):
        parser().parse_args(["--routing", "zipf:-2"])


# ---- report formats --------------------------------------------------------------------------------------

def test_render_table():
    rows = [{"name": "a", "x": 1.23456, "n": 3}, {"name": "longer name", "x": None, "n": 12}]
    text = render_table(rows, [("name", "name", ""), ("x", "value", ".2f"), ("n", "n", "d")], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["name", "value", "n"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3].startswith("a ") and lines[3].endswith(" 3") and "1.23" in lines[3]
    assert lines[4].startswith("longer name") and " - " in lines[4] and lines[4].endswith("12")
    assert len({len(line) for line in lines[2:4]}) == 1    # numbers right-aligned to the rule


def _report(**overrides):
    meta = make_meta("test", "reference", 2, {"tokens": 8}, command=["python", "-m", "ep_comm.bench"])
    summary = routing.imbalance(_route("zipf:1", tokens=8, experts=8, topk=2, world=2), 8, 2)
    report = make_report(meta, [{"name": "normal/dispatch/bf16/ep_comm", "algbw_gbps": 1.5}],
                         {"kind": "host memcpy", "bytes": 1 << 20, "gbps": 10.0, "median_us": 1.0},
                         [{"name": "normal/dispatch/bf16", "ok": True, "detail": ""}], ["a note"],
                         definitions={"algbw GB/s": "received token bytes / median time"},
                         resources={"device_sms": None, "normal": {"num_sms": None, "buffer_bytes": 1, "allocated": False}},
                         routing=[dict(routing="zipf:1", tokens=8, ll_tokens=8, hidden=128, **summary)])
    report.update(overrides)
    return report


def test_json_schema(tmp_path):
    report = _report()
    assert report["schema"] == SCHEMA == "ep_comm.bench/2"
    for key in ("benchmark", "date", "commit", "device", "backend", "ranks", "torch", "ep_comm", "command", "config"):
        assert key in report["meta"]
    assert report["meta"]["command"] == "python -m ep_comm.bench"
    path = tmp_path / "sub" / "r.json"
    write_json(report, str(path))
    loaded = json.loads(path.read_text())
    validate_report(loaded)
    assert loaded == report
    for bad, pattern in ((dict(schema="x"), "schema"), (dict(results=[{"gbps": 1}]), "name"),
                         (dict(results=[{"name": "a", "gbps": float("inf")}]), "non-finite"),
                         (dict(checks=[{"name": "c"}]), "'ok'"), (dict(ceiling={"gbps": 1}), "kind"),
                         (dict(definitions={"a": 1}), "definitions"), (dict(routing=[{"routing": "x"}]), "routing"),
                         (dict(schema="ep_comm.bench/1"), "schema")):
        with pytest.raises(ValueError, match=pattern):
            validate_report(_report(**bad))
    broken = _report()
    del broken["meta"]["commit"]
    with pytest.raises(ValueError, match="commit"):
        validate_report(broken)
    for key in ("definitions", "resources", "routing"):
        broken = _report()
        del broken[key]
        with pytest.raises(ValueError, match=key):
            validate_report(broken)


def test_progress_bar():
    stream = io.StringIO()
    bar = Progress(4, "sweep", enabled=True, stream=stream)
    bar.update("tokens=1")
    bar.update("tokens=2", step=5)
    bar.close()
    text = stream.getvalue()
    assert "1/4 tokens=1" in text and "4/4 tokens=2" in text and text.endswith("\n")
    quiet = io.StringIO()
    Progress(2, enabled=False, stream=quiet).update()
    assert quiet.getvalue() == ""


def test_interconnect_size_parsing():
    from ep_comm.bench import interconnect as module
    from ep_comm.bench.plots import human_bytes
    assert human_bytes(4096) == "4 KiB" and human_bytes(3 << 29) == "1.5 GiB" and human_bytes(512) == "512 B"
    assert module.parse_size("4K") == 4096 and module.parse_size("1GiB") == 1 << 30
    assert module.parse_size("16m") == 16 << 20 and module.parse_size("100") == 100
    assert module.human_size(4096) == "4 KiB" and module.human_size(1 << 30) == "1 GiB"
    assert module.human_size(1000) == "1000 B"


# ---- the one-process baseline against the emulator ---------------------------------------------------------

@pytest.mark.parametrize("world", [1, 3])
def test_emulated_baseline_does_the_same_job(world):
    num_experts, hidden = 4 * world, 256
    inputs = [make_inputs(SEED, r, (7 + 2 * r) if r < world - 1 or world == 1 else 0, hidden, 3, num_experts)
              for r in range(world)]
    base = EmulatedBaseline(world)
    per_rank = num_experts // world
    in_rank = []
    for inp in inputs:
        dest = torch.where(inp.topk_idx >= 0, inp.topk_idx // per_rank, -1)
        in_rank.append(torch.stack([(dest == r).any(1) for r in range(world)], 1).reshape(-1, world))
    received, orders = base.dispatch([i.x for i in inputs], in_rank)
    all_expected = [expected_dispatch(inputs, d, num_experts) for d in range(world)]
    for d in range(world):
        assert torch.equal(received[d][0], all_expected[d].recv_x)
    fp8_received, _ = base.dispatch([fp8.per_token_cast_to_fp8(i.x) for i in inputs], in_rank)
    for d in range(world):
        want = fp8.per_token_cast_to_fp8(all_expected[d].recv_x)
        assert torch.equal(fp8_received[d][0].view(torch.uint8), want[0].view(torch.uint8))
        assert torch.equal(fp8_received[d][1], want[1])
    combined = base.combine([r[0] for r in received], orders, [i.x.shape[0] for i in inputs])
    for s in range(world):
        want = expected_combine(all_expected, [e.recv_x for e in all_expected], s, inputs[s].x.shape[0])
        assert torch.equal(combined[s], want)

    ll_received, states = base.low_latency_dispatch([i.x for i in inputs], [i.topk_idx for i in inputs],
                                                    num_experts, False)
    for d in range(world):
        expected = expected_low_latency_dispatch(inputs, d, num_experts)
        rows = [inputs[s].x[t] for sources in expected.rows for s, t in sources]
        assert torch.equal(ll_received[d][0], torch.stack(rows) if rows else ll_received[d][0][:0])
    ll_combined = base.low_latency_combine([r[0] for r in ll_received], [i.topk_weights for i in inputs], states,
                                           num_experts)
    for s in range(world):
        want = expected_low_latency_combine(inputs[s], lambda e, src, t: inputs[src].x[t], s, num_experts, world)
        assert ll_combined[s].shape == want.shape and calc_diff(ll_combined[s], want) < 1e-5


# ---- smoke runs (subprocesses; a few seconds each) -----------------------------------------------------------

def _run(args, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_help_lists_every_option():
    out = _run(["-m", "ep_comm.bench", "--help"], None, timeout=60)
    for word in ("--routing", "zipf:S", "hot:K", "incast", "--model", "deepseek-v3", "qwen3-235b-a22b",
                 "mixtral-8x22b", "kimi-k2", "config.json", "--sweep", "--plot", "--graph", "--json", "--baseline",
                 "interconnect", "algbw GB/s", "busbw GB/s", "p99 us min/max", "max/mean"):
        assert word in out, word
    out = _run(["-m", "ep_comm.bench", "interconnect", "--help"], None, timeout=60)
    assert "--max-bytes" in out and "--plot" in out and "all_to_all_single" in out


def test_python_m_ep_comm_bench_smoke(tmp_path):
    out_json, plots = tmp_path / "bench.json", tmp_path / "plots"
    args = ["-m", "ep_comm.bench", "--ranks", "2", "--tokens", "8", "--hidden", "256", "--iters", "2", "--warmup", "0",
            "--routing", "hot:2", "--graph", "--json", str(out_json)]
    has_plots = importlib.util.find_spec("matplotlib") is not None
    out = _run(args + (["--plot", str(plots)] if has_plots else []), tmp_path)
    for header in ("algbw GB/s", "busbw GB/s", "median us min", "p99 us max", "max/mean", "% ceiling", "speedup"):
        assert header in out, header
    assert "ceiling: host memcpy" in out and "routing hot:2" in out and "resources" in out
    assert "check (6 cases" in out and "check (5 cases, all_to_all baseline" in out and "FAILED" not in out
    assert "--graph skipped: CUDA graphs need the GPU kernels" in out
    for mode, op, dtype in (("normal", "dispatch", "bf16"), ("normal", "dispatch", "fp8"), ("normal", "combine", "bf16"),
                            ("low_latency", "dispatch", "bf16"), ("low_latency", "dispatch", "fp8"),
                            ("low_latency", "combine", "bf16")):
        for impl in ("ep_comm", "baseline"):
            assert any(line.split()[:4] == [mode, op, dtype, impl] for line in out.splitlines()), (mode, op, dtype, impl)
    report = json.loads(out_json.read_text())
    validate_report(report)
    assert report["schema"] == "ep_comm.bench/2"
    assert report["meta"]["backend"] == "reference" and report["meta"]["ranks"] == 2
    assert report["meta"]["config"]["routing"] == "hot:2" and "skipped" in report["meta"]["config"]["graph"]
    assert len(report["results"]) == 12 and all(c["ok"] for c in report["checks"])
    assert {"algbw GB/s", "busbw GB/s", "p99 us min/max"} <= set(report["definitions"])
    assert report["resources"]["normal"]["allocated"] is False and report["resources"]["normal"]["buffer_bytes"] > 0
    (entry,) = report["routing"]
    assert entry["routing"] == "hot:2" and entry["tokens_per_expert"]["max_over_mean"] > 1
    for mode in ("normal", "low_latency"):   # the header's summary describes the very inputs the ranks timed
        want = entry[f"{mode}_rows_per_rank"]["max_over_mean"]
        assert all(r["recv_rows_max_over_mean"] == pytest.approx(want) for r in report["results"] if r["mode"] == mode)
    for row in report["results"]:
        assert row["launch"] == "eager" and row["median_us_min"] <= row["median_us_max"]
        assert row["p99_us_max"] >= row["median_us_max"] > 0 and row["algbw_gbps"] > 0
        assert (row["busbw_gbps"] is not None) == (row["impl"] == "baseline")
        assert (row.get("speedup") is not None) == (row["impl"] == "ep_comm")
    row = report["results"][0]
    assert row["bytes_per_rank"] == row["recv_rows_per_rank"] * 512
    if has_plots:
        pngs = sorted(p.name for p in plots.iterdir())
        assert pngs == ["ep_low_latency_algbw.png", "ep_low_latency_latency.png", "ep_normal_algbw.png",
                        "ep_normal_latency.png"]
        assert all((plots / p).stat().st_size > 1000 for p in pngs)


def test_sweep_and_incast_smoke(tmp_path):
    out_json = tmp_path / "sweep.json"
    out = _run(["-m", "ep_comm.bench", "--ranks", "2", "--sweep", "tokens", "--tokens", "4", "--hidden", "128",
                "--experts", "8", "--topk", "2", "--routing", "incast:1", "--mode", "low_latency", "--dtype", "bf16",
                "--baseline", "none", "--no-check", "--iters", "1", "--warmup", "0", "--json", str(out_json)], tmp_path)
    assert "routing incast:1" in out
    report = json.loads(out_json.read_text())
    validate_report(report)
    assert sorted({r["tokens"] for r in report["results"]}) == [1, 2, 4] and len(report["routing"]) == 3
    for row in report["results"]:
        assert row["impl"] == "ep_comm" and row["recv_rows_max_over_mean"] == pytest.approx(2.0)   # all into rank 1
    for entry in report["routing"]:
        assert entry["low_latency_rows"][0] == 0 and entry["low_latency_rows"][1] == 2 * entry["tokens"] * 2
    proc = subprocess.run([sys.executable, "-m", "ep_comm.bench", "--ranks", "2", "--experts", "8", "--topk", "8",
                           "--routing", "incast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "do not fit" in proc.stderr


def test_sweep_bytes_with_a_model_smoke(tmp_path):
    out_json, plots = tmp_path / "bytes.json", tmp_path / "plots"
    has_plots = importlib.util.find_spec("matplotlib") is not None
    out = _run(["-m", "ep_comm.bench", "--ranks", "2", "--model", "mixtral-8x22b", "--hidden", "512", "--tokens", "4",
                "--sweep", "bytes", "--mode", "normal", "--dtype", "fp8", "--baseline", "none", "--no-check",
                "--iters", "1", "--warmup", "0", "--json", str(out_json)]
               + (["--plot", str(plots)] if has_plots else []), tmp_path)
    assert "mistralai/Mixtral-8x22B-v0.1 config.json" in out
    report = json.loads(out_json.read_text())
    validate_report(report)
    assert report["meta"]["config"]["model"] == "mixtral-8x22b" and report["meta"]["config"]["sweep"] == "bytes"
    rows = [r for r in report["results"] if r["op"] == "dispatch"]
    assert [r["hidden"] for r in rows] == [128, 256, 512] and {(r["topk"], r["experts"]) for r in rows} == {(2, 8)}
    assert [r["bytes_per_rank"] for r in rows] == sorted(r["bytes_per_rank"] for r in rows)
    if has_plots:
        assert sorted(p.name for p in plots.iterdir()) == ["ep_normal_algbw.png", "ep_normal_latency.png"]


def test_interconnect_smoke(tmp_path):
    ic_json, plots = tmp_path / "ic.json", tmp_path / "plots"
    has_plots = importlib.util.find_spec("matplotlib") is not None
    out = _run(["-m", "ep_comm.bench", "interconnect", "--max-bytes", "8K", "--iters", "1", "--warmup", "0",
                "--json", str(ic_json)] + (["--plot", str(plots)] if has_plots else []), tmp_path)
    if has_plots:
        assert all((plots / name).stat().st_size > 1000
                   for name in ("interconnect_bandwidth.png", "interconnect_latency.png"))
    assert "a2a/all_to_all_single" in out and "local/copy" in out and "nvshmem/put" in out and "p99 us" in out
    report = json.loads(ic_json.read_text())
    validate_report(report)
    names = {r["name"] for r in report["results"]}
    assert {"p2p/memcpy", "local/copy", "a2a/all_to_all_single", "nvshmem/put", "nvshmem/put_signal"} <= names
    a2a = [r for r in report["results"] if r["name"] == "a2a/all_to_all_single"]
    assert all(r["bus_gbps"] == pytest.approx(r["gbps"] / 2) for r in a2a)


def test_plot_without_matplotlib_stops_before_measuring(tmp_path):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), ROOT, os.environ.get("PYTHONPATH", "")]))
    for args in (["--plot", str(tmp_path / "p")], ["interconnect", "--plot", str(tmp_path / "p")]):
        proc = subprocess.run([sys.executable, "-m", "ep_comm.bench", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "pip install .[bench]" in proc.stderr, proc.stderr
        assert not (tmp_path / "p").exists()


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from ep_comm.bench.plots import chart_title, line_chart
    rows = [{"size_bytes": 1 << s, "gbps": s * 0.1, "op": op, "impl": impl} for s in (12, 20, 30)
            for op in ("dispatch bf16", "combine bf16") for impl in ("ep_comm", "baseline")]
    title = chart_title({"backend": "reference", "device": "CPU", "ranks": 2})
    assert title == "reference backend, CPU, 2 ranks"
    path = line_chart(rows, "size_bytes", "gbps", str(tmp_path / "p" / "bw.png"), title, "x", "y", x_bytes=True)
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    empty = line_chart([], "size_bytes", "gbps", str(tmp_path / "empty.png"), title, "x", "y")
    assert os.path.getsize(empty) > 0
