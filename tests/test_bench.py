"""Benchmarks: byte counting, report formats and the baselines on CPU -- never timings -- plus smoke
runs of `python -m ep_comm.bench`, bench/bench_ep.py and bench/bench_interconnect.py at tiny sizes."""
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
from ep_comm.bench import counting
from ep_comm.bench.baseline import EmulatedBaseline
from ep_comm.bench.ep import Sample, aggregate, attach_speedups, ranks_per_memory
from ep_comm.bench.report import (SCHEMA, Progress, make_meta, make_report, render_table, validate_report,
                                  write_json)
from ep_comm.bench.timing import Timer
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
    samples = [Sample("normal", "dispatch", "bf16", "ep_comm", 8, 10, 1_000_000, 0.001, 0.0009),
               Sample("normal", "dispatch", "bf16", "ep_comm", 8, 30, 3_000_000, 0.002, 0.0019)]
    row = aggregate(samples, ceiling_gbps=100.0, ranks_sharing=2)
    assert row["name"] == "normal/dispatch/bf16/ep_comm" and row["ranks"] == 2
    assert row["recv_rows_per_rank"] == 20 and row["bytes_per_rank"] == 2_000_000
    assert row["gbps_per_rank"] == pytest.approx((1.0 + 1.5) / 2)
    assert row["gbps_total"] == pytest.approx(2.5)
    assert row["latency_us"] == pytest.approx(1500) and row["latency_max_us"] == pytest.approx(2000)
    assert row["fraction_of_ceiling"] == pytest.approx(2 * 1.25 * 2 / 100)
    assert aggregate(samples, None, 2)["fraction_of_ceiling"] is None
    base = dict(row, impl="baseline", gbps_total=1.25)
    rows = [row, base]
    attach_speedups(rows)
    assert row["speedup"] == pytest.approx(2.0) and "speedup" not in base
    assert ranks_per_memory(4, "cpu", 0) == 4
    assert ranks_per_memory(4, "cuda", 1) == 4
    assert ranks_per_memory(8, "cuda", 8) == 1
    assert ranks_per_memory(5, "cuda", 2) == 3


def test_timer_counts_iterations_on_cpu():
    calls = []
    timing = Timer(torch.device("cpu")).measure(lambda: calls.append(1), iters=3, warmup=2,
                                                before=lambda: calls.append(0))
    assert timing.iters == 3 and len(calls) == 10 and timing.min_s <= timing.median_s <= timing.max_s
    with pytest.raises(ValueError):
        Timer(torch.device("cpu")).measure(lambda: None, iters=0, warmup=0)


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
    report = make_report(meta, [{"name": "normal/dispatch/bf16/ep_comm", "gbps_per_rank": 1.5}],
                         {"kind": "host memcpy", "bytes": 1 << 20, "gbps": 10.0, "median_us": 1.0},
                         [{"name": "normal/dispatch/bf16", "ok": True, "detail": ""}], ["a note"])
    report.update(overrides)
    return report


def test_json_schema(tmp_path):
    report = _report()
    assert report["schema"] == SCHEMA
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
                         (dict(checks=[{"name": "c"}]), "'ok'"), (dict(ceiling={"gbps": 1}), "kind")):
        with pytest.raises(ValueError, match=pattern):
            validate_report(_report(**bad))
    broken = _report()
    del broken["meta"]["commit"]
    with pytest.raises(ValueError, match="commit"):
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
    spec = importlib.util.spec_from_file_location("bench_interconnect", os.path.join(ROOT, "bench", "bench_interconnect.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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


def test_python_m_ep_comm_bench_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    out = _run(["-m", "ep_comm.bench", "--ranks", "2", "--tokens", "8", "--hidden", "256", "--iters", "2",
                "--warmup", "0", "--json", str(out_json)], tmp_path)
    assert "GB/s/rank" in out and "% ceiling" in out and "ceiling: host memcpy" in out
    assert "check (6 cases" in out and ": ok" in out
    for mode, op, dtype in (("normal", "dispatch", "bf16"), ("normal", "dispatch", "fp8"), ("normal", "combine", "bf16"),
                            ("low_latency", "dispatch", "bf16"), ("low_latency", "dispatch", "fp8"),
                            ("low_latency", "combine", "bf16")):
        assert any(line.split()[:3] == [mode, op, dtype] for line in out.splitlines()), (mode, op, dtype)
    report = json.loads(out_json.read_text())
    validate_report(report)
    assert report["meta"]["backend"] == "reference" and report["meta"]["ranks"] == 2
    assert len(report["results"]) == 6 and all(c["ok"] for c in report["checks"])
    row = report["results"][0]
    assert row["bytes_per_rank"] == row["recv_rows_per_rank"] * 512 and row["gbps_per_rank"] > 0


def test_bench_ep_and_interconnect_smoke(tmp_path):
    ep_json, ic_json = tmp_path / "ep.json", tmp_path / "ic.json"
    out = _run(["bench/bench_ep.py", "--ranks", "2", "--tokens", "4", "--hidden", "256", "--mode", "normal",
                "--dtype", "bf16", "--iters", "1", "--warmup", "0", "--json", str(ep_json)], tmp_path)
    assert "speedup" in out and "baseline" in out and "all_to_all baseline against ep_comm" in out
    report = json.loads(ep_json.read_text())
    validate_report(report)
    impls = sorted(r["impl"] for r in report["results"])
    assert impls == ["baseline", "baseline", "ep_comm", "ep_comm"]
    assert all(c["ok"] for c in report["checks"])
    assert all(r.get("speedup") is not None for r in report["results"] if r["impl"] == "ep_comm")
    out = _run(["bench/bench_interconnect.py", "--max-bytes", "8K", "--iters", "1", "--warmup", "0",
                "--json", str(ic_json)], tmp_path)
    assert "a2a/all_to_all_single" in out and "local/copy" in out and "nvshmem/put" in out
    names = {r["name"] for r in json.loads(ic_json.read_text())["results"]}
    assert {"p2p/memcpy", "local/copy", "a2a/all_to_all_single", "nvshmem/put", "nvshmem/put_signal"} <= names


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from ep_comm.bench.plots import line_chart
    rows = [{"tokens": t, "gbps_per_rank": t * 0.1, "op": "dispatch", "impl": impl} for t in (1, 2, 4)
            for impl in ("ep_comm", "baseline")]
    path = line_chart(rows, "tokens", "gbps_per_rank", ("op", "impl"), str(tmp_path / "p" / "bw.png"), "t", "x", "y")
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
