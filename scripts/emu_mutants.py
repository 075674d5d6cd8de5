#!/usr/bin/env python3
"""Mutation check of the emulated-device checks: seeded bugs in the intranode kernels must be caught.

    python scripts/emu_mutants.py [--only NAME[,NAME...]] [--all-runs] [--list] [--keep]

Each mutant is a set of textual replacements in csrc/kernels/intranode.cu or
csrc/kernels/common/intranode_device.cuh (each pattern must occur exactly once in the current file,
else the script fails loudly: the kernels changed and the mutant needs updating). The mutant is
applied to a temporary copy of csrc/, the driver (tests/emulator/intranode_driver.cpp) is rebuilt
from that copy for the variant(s) the mutant names, recompiling only the objects that depend on the
mutated file (the others come from build/emu-check/<variant>, scripts/emu_build.py), and the driver
runs the mutant's cases. A mutant is caught by a nonzero exit with a sanitizer report, an
emulated-device fault (deadlock, divergent collective, barrier mismatch, hang, or a guard-page
SIGSEGV), a timeout (the kernels' own device timeout, or no result at all), a kernel-reported error,
or a mismatch with the driver's reference. A mutant that survives is a hole in the checks.

Runs of a mutant go in order and stop at the first that catches it (--all-runs: run them all and
list every detector). The unmutated build runs the same cases first and must pass.
Exit status: 0 when the unmutated build passes and every mutant is caught, else 1.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emu_build  # noqa: E402

ROOT = emu_build.ROOT
CSRC = os.path.join(ROOT, "csrc")
INTRANODE = "kernels/intranode.cu"
DEVICE = "kernels/common/intranode_device.cuh"

# Driver cases. TSan runs stay tiny (g++ libtsan: ~8 s and ~3 GB for one call); the bf16 case covers
# notify, dispatch, cached dispatch and combine. Whether TSan sees a head released too early
# depends on the interleaving: the writer must be waiting for exactly that head (when the reader
# is ahead, the writer acquires a later head, whose clock covers the reads). So a race mutant runs
# two ring shapes. Measured on this 2-core machine:
#   head_before_reads          32 tokens, 4 slots: ~3 of 4 seeds   64 tokens, 2 slots: 10 of 10
#   combine_drop_syncthreads   32 tokens, 4 slots: 8 of 8           64 tokens, 2 slots: 0 of 3
TSAN_CASE = ["--ranks", "2", "--channels", "1", "--tokens", "32", "--slots", "4", "--cases", "bf16",
             "--timeout-s", "30"]
TSAN_CASE_ROW_RING = ["--ranks", "2", "--channels", "1", "--tokens", "64", "--slots", "2", "--cases", "bf16",
                      "--timeout-s", "30"]  # rounds of one row: the writer waits for every head
TSAN_RUNS = [("thread", TSAN_CASE), ("thread", TSAN_CASE_ROW_RING)]
PLAIN_CASE = ["--ranks", "2", "--tokens", "80", "--timeout-s", "10"]  # bf16, fp8, worst; 2/1/2 channels
PLAIN_CASE_3 = ["--ranks", "3", "--seed", "5", "--tokens", "80", "--timeout-s", "10"]
WORST_CASE = ["--ranks", "2", "--cases", "worst", "--timeout-s", "10"]   # num_worst_tokens padding rows

SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
    "EP_COMM_EMU_HANG_S": "60",
}


@dataclass
class Mutant:
    name: str
    file: str                            # relative to csrc/
    edits: List[Tuple[str, str]]         # (exact old text, new text)
    runs: List[Tuple[str, List[str]]]    # (variant, driver args), in order
    what: str = ""


def publish_tail(value: str) -> str:
    return f"ptx::st_release_sys(tail, static_cast<unsigned long long>(make_tagged(epoch, uint32_t({value}))));"


MUTANTS: List[Mutant] = [
    Mutant(
        "tail_before_payload", INTRANODE,
        [("    if (*s_flag != 0) break;\n\n    for (int token = round_begin + group.sub; token < round_end; "
          "token += group.num_warps) {\n",
          "    if (*s_flag != 0) break;\n    if (group.leader()) " + publish_tail("position_end") + "\n\n"
          "    for (int token = round_begin + group.sub; token < round_end; token += group.num_warps) {\n"),
         ("    group.sync();  // every warp's slot stores precede the leader's release below\n"
          "    if (group.leader()) {\n      ptx::fence_acq_rel_sys();\n      " + publish_tail("position_end") +
          "\n    }\n",
          "    group.sync();\n")],
        TSAN_RUNS + [("plain", PLAIN_CASE)],
        "dispatch_send publishes the ring tail before the warps store the round's slots"),
    Mutant(
        "head_before_reads", INTRANODE,
        [("    const int available = *s_flag;\n    if (available < 0) break;\n",
          "    const int available = *s_flag;\n    if (available < 0) break;\n    if (group.leader())\n"
          "      ptx::st_release_sys(head, static_cast<unsigned long long>(make_tagged(epoch, uint32_t(available))));\n"),
         ("    group.sync();  // all reads of these slots are done before the writer may reuse them\n"
          "    if (group.leader())\n"
          "      ptx::st_release_sys(head, static_cast<unsigned long long>(make_tagged(epoch, uint32_t(available))));\n",
          "    group.sync();\n")],
        TSAN_RUNS + [("plain", PLAIN_CASE)],
        "dispatch_recv releases the ring head before its warps copied the slots out"),
    Mutant(
        "combine_drop_syncthreads", INTRANODE,
        [("    __syncthreads();  // every read of this round's slots is done\n", "")],
        TSAN_RUNS + [("plain", PLAIN_CASE)],
        "combine_recv releases heads without the __syncthreads that ends the round's reads"),
    Mutant(
        "row_past_end", INTRANODE,
        [("; row < args.num_recv_rows;\n", "; row <= args.num_recv_rows;\n")],
        [("address", WORST_CASE), ("plain", WORST_CASE)],
        "the num_worst_tokens padding loop writes one row past recv_x and the other outputs"),
    Mutant(
        "named_barrier_count", INTRANODE,
        [("ptx::named_barrier(peer + 1, num_warps * 32);", "ptx::named_barrier(peer + 1, (num_warps - 1) * 32);")],
        [("plain", PLAIN_CASE)],
        "the warp-group barrier waits for one warp too few"),
    Mutant(
        "epoch_not_advanced", DEVICE,
        [("      ptx::st_release_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], layout.epoch_offset()),\n"
          "                          static_cast<unsigned long long>(epoch));\n",
          "      ptx::st_release_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], layout.epoch_offset()),\n"
          "                          static_cast<unsigned long long>(epoch - 1));\n")],
        [("plain", PLAIN_CASE)],
        "finish_epoch never advances the epoch: every kernel's tags equal the previous kernel's"),
    Mutant(
        "tail_stale_epoch_tag", INTRANODE,
        [("      " + publish_tail("position_end") + "\n",
          "      ptx::st_release_sys(tail, static_cast<unsigned long long>(make_tagged(epoch - 1, "
          "uint32_t(position_end))));\n")],
        [("plain", PLAIN_CASE)],
        "dispatch_send tags its tail with the previous epoch (the receiver must time out, not hang)"),
    Mutant(
        "prefix_sum_inclusive", DEVICE,
        [("  return warp_base + inclusive - value;\n", "  return warp_base + inclusive;\n")],
        [("plain", PLAIN_CASE), ("address", PLAIN_CASE)],
        "block_exclusive_sum returns the inclusive prefix: recv_start is off by one ring"),
    Mutant(
        "divergent_ballot", INTRANODE,
        [("      const unsigned ballot = __ballot_sync(0xffffffffu, (mask >> r) & 1u);\n",
          "      const unsigned ballot = token < end ? __ballot_sync(0xffffffffu, (mask >> r) & 1u) : 0u;\n")],
        [("plain", PLAIN_CASE)],
        "notify's ballot is skipped by the lanes past the channel's last token (full mask)"),
    # ---- cheap extras ----
    Mutant(
        "wait_relaxed", DEVICE,
        [("    const uint64_t value = ptx::ld_acquire_sys(reinterpret_cast<const unsigned long long*>(word));\n",
          "    const uint64_t value = ptx::ld_relaxed_sys(reinterpret_cast<const unsigned long long*>(word));\n")],
        TSAN_RUNS + [("plain", PLAIN_CASE)],
        "wait_tagged_at_least polls tails/heads/counters without acquire"),
    Mutant(
        "combine_tail_relaxed", INTRANODE,
        [("      ptx::fence_acq_rel_sys();\n      " + publish_tail("round_end") + "\n",
          "      ptx::st_relaxed_sys(tail, static_cast<unsigned long long>(make_tagged(epoch, uint32_t(round_end))));\n")],
        TSAN_RUNS + [("plain", PLAIN_CASE)],
        "combine_send publishes its tail with a relaxed store and no fence"),
    Mutant(
        "notify_drop_syncthreads", INTRANODE,
        [("      if (lane == 0) s_warp_offset[warp][r] = __popc(ballot);\n    }\n    __syncthreads();\n",
          "      if (lane == 0) s_warp_offset[warp][r] = __popc(ballot);\n    }\n")],
        TSAN_RUNS + [("plain", PLAIN_CASE)],
        "notify scans the per-warp counts without waiting for every warp to write them"),
    Mutant(
        "combine_drop_bias1", INTRANODE,
        [("        if (bias1 != nullptr) add_bf16x8(acc, ptx::ld_nc_global(bias1 + i));\n", "")],
        [("plain", PLAIN_CASE)],
        "combine ignores the second bias"),
    Mutant(
        "weights_not_masked", INTRANODE,
        [("(mine && args.topk_weights != nullptr) ?", "(args.topk_weights != nullptr) ?")],
        [("plain", PLAIN_CASE)],
        "dispatch sends the weights of other ranks' experts instead of 0"),
    Mutant(
        "alignment_dropped", INTRANODE,
        [("int((sum + align - 1) / align * align)", "int(sum)")],
        [("plain", PLAIN_CASE)],
        "per-expert receive counts are not rounded up to expert_alignment"),
    Mutant(
        "padding_not_zeroed", INTRANODE,
        [("ptx::st_na_global(out + i, make_int4(0, 0, 0, 0));", "(void)out;")],
        [("plain", PLAIN_CASE)],
        "num_worst_tokens padding rows of recv_x keep whatever the allocation held"),
    Mutant(
        "scales_of_token_0", INTRANODE,
        [("scales[i] = __ldg(args.x_scales + int64_t(token) * args.num_scales + i);",
          "scales[i] = __ldg(args.x_scales + i);")],
        [("plain", PLAIN_CASE)],
        "FP8 dispatch sends the scales of the channel's first token with every row"),
    Mutant(
        "channel_pos_shifted", INTRANODE,
        [("if (r < num_ranks) pos[r] = s_warp_offset[warp][r] + lane_prefix[r];",
          "if (r < num_ranks) pos[r] = s_warp_offset[warp][r] + lane_prefix[r] + (warp > 0 ? 1 : 0);")],
        [("plain", PLAIN_CASE_3)],
        "channel_pos off by one from the second warp of a notify tile on (needs > 32 tokens per channel)"),
]


# ---- running ---------------------------------------------------------------------------------------

DETECTORS = [
    # (label, regex over the output), strongest evidence first
    ("TSan", re.compile(r"WARNING: ThreadSanitizer")),
    ("ASan", re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)")),
    ("UBSan", re.compile(r"runtime error:")),
    ("emulator fault (guard page)", re.compile(r"EMULATOR FAULT: signal")),
    ("emulator fault", re.compile(r"EMULATOR FAULT: ep_comm|ep_comm emulated device:")),
    ("timeout", re.compile(r"timed out in phase|timed out on the host|TIMEOUT:")),
    ("mismatch", re.compile(r"^MISMATCH", re.M)),
    ("kernel error", re.compile(r"^ERROR rank", re.M)),
]


def classify(rc: int, output: str) -> Optional[str]:
    """What caught a run ("timeout + mismatch": the first is the strongest evidence), or None if it
    passed."""
    if rc == 0 and not any(p.search(output) for _, p in DETECTORS[:3]):
        return None
    labels = [label for label, pattern in DETECTORS if pattern.search(output)]
    if label_of_rc := {124: "timeout (no result)", 137: "timeout (no result)", -9: "timeout (no result)",
                       -11: "emulator fault (guard page)", 139: "emulator fault (guard page)",
                       -7: "emulator fault (SIGBUS)", 135: "emulator fault (SIGBUS)"}.get(rc):
        labels.append(label_of_rc)
    if "emulator fault (guard page)" in labels and "emulator fault" in labels:
        labels.remove("emulator fault")
    labels = list(dict.fromkeys(labels))
    return " + ".join(labels) if labels else f"crash (exit status {rc})"


def run_driver(driver: str, args: Sequence[str], limit_s: int, log_path: str) -> Tuple[int, str, float]:
    env = dict(os.environ)
    env.update(SANITIZER_ENV)
    start = time.monotonic()
    try:
        proc = subprocess.run(["timeout", "-k", "5", str(limit_s), driver] + list(args), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        rc, out = proc.returncode, proc.stdout
    except OSError as e:
        rc, out = 127, str(e)
    with open(log_path, "w") as f:
        f.write(f"$ {driver} {' '.join(args)}\n{out}\nexit status {rc}\n")
    return rc, out, time.monotonic() - start


def first_lines(output: str, n: int = 3) -> str:
    keep = [l for l in output.splitlines()
            if re.search(r"MISMATCH|ERROR|FAULT|TIMEOUT|WARNING: |SUMMARY|runtime error|emulated device", l)]
    return "\n".join("      " + l[:240] for l in keep[:n])


def check_patterns(mutants: Sequence[Mutant]) -> List[str]:
    problems = []
    for m in mutants:
        text = open(os.path.join(CSRC, m.file)).read()
        for i, (old, _) in enumerate(m.edits):
            count = text.count(old)
            if count != 1:
                problems.append(f"mutant {m.name}: edit {i + 1} pattern occurs {count} times in csrc/{m.file} "
                                f"(expected exactly once):\n{old}")
    return problems


def apply(text: str, m: Mutant) -> str:
    for old, new in m.edits:
        assert text.count(old) == 1, (m.name, old)
        text = text.replace(old, new)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--all-runs", action="store_true", help="run every listed run of a mutant, not only until caught")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy of csrc/")
    parser.add_argument("--limit-s", type=int, default=240, help="wall-clock limit of one driver run")
    parser.add_argument("--seed", type=int, help="driver seed for every run (default: the cases' own)")
    parser.add_argument("--variants", help="only the runs of these variants (comma-separated: plain,address,thread)")
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {m.name for m in MUTANTS}]
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(unknown)}")
        mutants = [m for m in MUTANTS if m.name in names]
    if args.variants or args.seed is not None:
        keep = set(args.variants.split(",")) if args.variants else set(emu_build.VARIANTS)
        extra = ["--seed", str(args.seed)] if args.seed is not None else []
        mutants = [Mutant(m.name, m.file, m.edits, [(v, a + extra) for v, a in m.runs if v in keep], m.what)
                   for m in mutants]
        mutants = [m for m in mutants if m.runs]
    if args.list:
        for m in mutants:
            print(f"{m.name:26s} csrc/{m.file:40s} {', '.join(v for v, _ in m.runs):16s} {m.what}")
        return 0

    problems = check_patterns(mutants)
    if problems:
        print("emu_mutants: the kernels changed; update these mutants:\n" + "\n".join(problems), file=sys.stderr)
        return 1

    t_start = time.monotonic()
    logs = os.path.join(ROOT, "build", "emu-check", "logs", "mutants")
    os.makedirs(logs, exist_ok=True)
    variants = sorted({v for m in mutants for v, _ in m.runs}, key=emu_build.VARIANTS.index)

    # The unmutated build of every variant, and its run of every case a mutant uses.
    base: Dict[str, str] = {}
    ok = True
    for v in variants:
        t0 = time.monotonic()
        try:
            base[v] = emu_build.build(v, quiet=True)
        except (subprocess.CalledProcessError, SystemExit) as e:
            print(f"unmutated build ({v}) FAILED: {e}")
            return 1
        print(f"built {v} ({time.monotonic() - t0:.0f} s)", flush=True)
    cases = []
    for m in mutants:
        for v, a in m.runs:
            if (v, a) not in cases:
                cases.append((v, a))
    for i, (v, a) in enumerate(cases):
        rc, out, secs = run_driver(base[v], a, args.limit_s, os.path.join(logs, f"unmutated-{v}-{i}.log"))
        verdict = classify(rc, out)
        print(f"unmutated {v:7s} {' '.join(a)}: {'ok' if verdict is None else 'FAILED: ' + verdict} ({secs:.0f} s)",
              flush=True)
        if verdict is not None:
            print(first_lines(out, 8))
            ok = False
    if not ok:
        print("emu_mutants: the unmutated build fails its cases; fix that first")
        return 1

    tmp = tempfile.mkdtemp(prefix="ep_comm_mutants_")
    copy_csrc = os.path.join(tmp, "csrc")
    shutil.copytree(CSRC, copy_csrc)
    rows: List[Tuple[str, str, str, float]] = []
    try:
        for m in mutants:
            path = os.path.join(copy_csrc, m.file)
            original = open(path).read()
            with open(path, "w") as f:
                f.write(apply(original, m))
            t0 = time.monotonic()
            caught: List[str] = []
            try:
                for run_index, (v, a) in enumerate(m.runs):
                    build_dir = os.path.join(ROOT, "build", "emu-check", "mutants", v)
                    try:
                        driver = emu_build.build_from_copy(v, os.path.dirname(base[v]), copy_csrc, [m.file], build_dir)
                    except (subprocess.CalledProcessError, SystemExit) as e:
                        print(f"mutant {m.name}: the build failed ({e}); fix the mutant")
                        caught.append(f"build failure ({v})")
                        ok = False
                        break
                    rc, out, secs = run_driver(driver, a, args.limit_s, os.path.join(logs, f"{m.name}-{run_index}-{v}.log"))
                    verdict = classify(rc, out)
                    print(f"  {m.name} [{v}] {' '.join(a)}: {verdict or 'SURVIVED'} ({secs:.0f} s)", flush=True)
                    if verdict is not None:
                        print(first_lines(out))
                        caught.append(f"{verdict} ({v})")
                        if not args.all_runs:
                            break
            finally:
                with open(path, "w") as f:
                    f.write(original)
            rows.append((m.name, m.file, "; ".join(caught) if caught else "SURVIVED", time.monotonic() - t0))
    finally:
        if args.keep:
            print(f"kept the mutated copy's directory {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    survivors = [r for r in rows if r[2] == "SURVIVED" or r[2].startswith("build failure")]
    print()
    width = max(len(r[0]) for r in rows)
    det_width = max(len(r[2]) for r in rows)
    print(f"{'mutant':{width}s}  {'file':28s}  {'caught by':{det_width}s}  seconds")
    for name, file, detector, secs in rows:
        print(f"{name:{width}s}  {os.path.basename(file):28s}  {detector:{det_width}s}  {secs:7.1f}")
    total = time.monotonic() - t_start
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutants caught; {total:.0f} s in all "
          f"(logs: {os.path.relpath(logs, ROOT)})")
    if survivors or not ok:
        print("emu_mutants: FAILED: " + ", ".join(r[0] for r in survivors) + " survived: a hole in the checks")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
