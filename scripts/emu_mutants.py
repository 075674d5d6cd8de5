#!/usr/bin/env python3
"""Mutation check of the emulated-device checks: seeded bugs in the kernels must be caught.

    python scripts/emu_mutants.py [--only NAME[,NAME...]] [--family intranode|low_latency|internode] [--all-runs]
                                  [--list] [--keep]

Each mutant is a set of textual replacements in one file of csrc/kernels (intranode.cu,
common/intranode_device.cuh, low_latency.cu, common/low_latency_layout.cuh, internode.cu,
common/internode_layout.cuh; each pattern
must occur exactly once in the current file, else the script fails loudly: the kernels changed and the mutant
needs updating). The mutant is applied to a temporary copy of csrc/, its family's driver
(tests/emulator/{intranode,low_latency,internode}_driver.cpp) is rebuilt from that copy for the
variant(s) the mutant names, recompiling only the objects that depend on the mutated file (the
others come from build/emu-check/<variant>, scripts/emu_build.py), and the driver runs the
mutant's cases. A mutant is caught by a nonzero exit with a sanitizer report, an
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
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emu_build  # noqa: E402

ROOT = emu_build.ROOT
CSRC = os.path.join(ROOT, "csrc")
INTRANODE = "kernels/intranode.cu"
DEVICE = "kernels/common/intranode_device.cuh"
LOW_LATENCY = "kernels/low_latency.cu"
INTERNODE = "kernels/internode.cu"
IN_LAYOUT = "kernels/common/internode_layout.cuh"
LL_LAYOUT = "kernels/common/low_latency_layout.cuh"

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

# Low-latency driver cases (tests/emulator/low_latency_driver.cpp): the default cases run 16 ops per
# rank (bf16, fp8, zerocopy, double, inflight, full); TSan runs take three of them on 4 emulated SMs
# (~10 s, ~1.7 GB). P2P: direct stores and atomics into peers' heaps; PUT: NVSHMEM_DISABLE_P2P=1,
# every row a put-with-signal delivered late by the emulated network.
LL_PLAIN = ["--ranks", "2", "--timeout-s", "5"]
LL_PLAIN_PUT = LL_PLAIN + ["--p2p", "0"]
# Rank r launches its sends r ms late: receivers already wait when rows land (a receiver that stops
# waiting too early reads the previous op's rows: caught by ~8 of 10 seeds, hence four runs).
LL_SKEW = LL_PLAIN + ["--skew-us", "1000"]
LL_SKEW_RUNS = [("plain", LL_SKEW), ("plain", LL_SKEW + ["--p2p", "0"]), ("plain", LL_SKEW + ["--seed", "3"]),
                ("plain", LL_SKEW + ["--p2p", "0", "--seed", "4"])]
LL_TSAN = ["--ranks", "2", "--sms", "4", "--tokens", "8", "--cases", "bf16,double,inflight", "--timeout-s", "30"]
LL_TSAN_PUT = LL_TSAN + ["--p2p", "0"]
# Puts that linger (up to 2 ms each) before the emulated network delivers them.
SLOW_NETWORK = {"EP_COMM_EMU_NVSHMEM_DELAY_US": "2000"}

# Internode driver cases (tests/emulator/internode_driver.cpp): 2 nodes x 2 ranks, every case (bf16,
# fp8, cached, worst), RDMA rings of 8 slots and NVL rings of 2 (they wrap). IN_SLOW: one token per
# put and puts that linger, so several puts to one tail are in flight at once. TSan: 2 nodes x 1
# rank, one channel, the bf16 case (~5 s, ~0.9 GB).
IN_PLAIN = ["--ranks", "4", "--per-node", "2", "--timeout-s", "15"]  # a loaded 2-core machine: 5 s was too tight
IN_SLOW = IN_PLAIN + ["--rdma-chunk", "1", "--tokens", "32"]
IN_TSAN = ["--ranks", "2", "--per-node", "1", "--channels", "1", "--tokens", "8", "--cases", "bf16", "--timeout-s", "30"]
# Rings of 2 dispatch slots (combine's RDMA ring: 1 slot, every partial a lap): a credit one too
# many is used at once.
IN_TINY_RINGS = ["--ring-tokens", "2", "--rdma-chunk", "1", "--nvl-chunk", "1"]
# Many credit signals in flight to one forwarder (8 ranks as 2 x 4, top-2, 4-slot rings): the emulated
# network delivers them in any order, as an unordered RDMA transport may.
IN_CREDIT_ORDER = ["--ranks", "8", "--per-node", "4", "--tokens", "37", "--topk", "2", "--experts", "32",
                   "--channels", "2", "--ring-tokens", "2", "--rdma-chunk", "1", "--nvl-chunk", "1", "--cases", "bf16",
                   "--timeout-s", "15"]

SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
    "EP_COMM_EMU_HANG_S": "60",
}


# One run: (variant, driver args), or (variant, driver args, extra environment).
Run = Tuple


@dataclass
class Mutant:
    name: str
    file: str                            # relative to csrc/
    edits: List[Tuple[str, str]]         # (exact old text, new text)
    runs: List[Run]                      # in order
    what: str = ""
    driver: str = "intranode"            # scripts/emu_build.py DRIVERS


def run_parts(run: Run) -> Tuple[str, List[str], Dict[str, str]]:
    """(variant, args, extra environment) of a run."""
    return run[0], list(run[1]), dict(run[2]) if len(run) > 2 else {}


def run_text(run: Run) -> str:
    _, args, env = run_parts(run)
    return " ".join([f"{k}={v}" for k, v in env.items()] + args)


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
        TSAN_RUNS + [("thread", TSAN_CASE_ROW_RING + ["--seed", "2"], {"EP_COMM_EMU_SCHEDULE": "reverse"}),
                     ("thread", TSAN_CASE_ROW_RING + ["--seed", "3"], {"EP_COMM_EMU_SCHEDULE": "random:3"}),
                     ("plain", PLAIN_CASE)],
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

    # ---- low-latency (csrc/kernels/low_latency.cu, common/low_latency_layout.cuh) ----
    # Patterns avoid begin_send and dispatch_send's slot walk (edited elsewhere at the time of writing).
    Mutant(
        "ll_publish_without_fence", LOW_LATENCY,
        [("  __syncwarp();\n  if (lane == 0) __threadfence_system();\n  __syncwarp();\n", "  __syncwarp();\n  __syncwarp();\n")],
        [("thread", LL_TSAN)],
        "publish_p2p: rows stored into a peer, then the counter add without the system fence", "low_latency"),
    Mutant(
        "ll_send_without_quiet", LOW_LATENCY,
        [("    nvshmem_quiet();\n    __threadfence();\n", "    __threadfence();\n")],
        [("plain", LL_PLAIN_PUT, SLOW_NETWORK), ("thread", LL_TSAN_PUT)],
        "end_send does not quiet: the next send rewrites staging that puts still read", "low_latency"),
    Mutant(
        "ll_recv_other_half", LOW_LATENCY,
        [("  const uint64_t epoch = *a.call_epoch;\n  const int half = static_cast<int>(epoch & 1);\n\n"
          "  EP_DYNAMIC_SHARED(int, smem);\n  int* counts = smem;\n",
          "  const uint64_t epoch = *a.call_epoch;\n  const int half = static_cast<int>((epoch + 1) & 1);\n\n"
          "  EP_DYNAMIC_SHARED(int, smem);\n  int* counts = smem;\n")],
        [("plain", LL_PLAIN)],
        "dispatch_recv takes the double-buffer half of the op after its own (parity flipped)", "low_latency"),
    Mutant(
        "ll_dispatch_slot_stride", LL_LAYOUT,
        [("((local_expert * num_ranks + src) * num_max_tokens + slot) * slot_bytes",
          "((local_expert * num_ranks + src) * (num_max_tokens - 1) + slot) * slot_bytes")],
        [("plain", LL_PLAIN + ["--cases", "full"]), ("plain", LL_PLAIN + ["--cases", "full", "--seed", "2"]),
         ("plain", LL_PLAIN + ["--cases", "full", "--ranks", "3", "--seed", "3"]),
         ("plain", LL_PLAIN_PUT + ["--cases", "full", "--seed", "4"])],
        "dispatch_recv regions are T-1 slots apart: a source's slot T-1 is the next source's slot 0", "low_latency"),
    Mutant(
        "ll_combine_row_stride", LL_LAYOUT,
        [("(static_cast<int64_t>(expert) * num_max_tokens + slot) * slot_bytes",
          "(static_cast<int64_t>(expert) * (num_max_tokens - 1) + slot) * slot_bytes")],
        [("plain", LL_PLAIN)],
        "combine_recv rows of consecutive experts overlap by one row", "low_latency"),
    Mutant(
        "ll_ack_set", LOW_LATENCY,
        [("    signal_add(c.layout.ack(c.buffer, half, c.rank), 1, peer, c.use_p2p);\n",
          "    signal_set(c.layout.ack(c.buffer, half, c.rank), 1, peer, c.use_p2p);\n")],
        [("plain", LL_PLAIN)],
        "receive kernels SET their ack to 1 instead of adding 1: op 5 waits for a second ack for ever", "low_latency"),
    Mutant(
        "ll_arrived_not_reset", LOW_LATENCY,
        [("      ptx::st_relaxed_sys(arrived_words + i, static_cast<uint64_t>(0));\n", "")],
        LL_SKEW_RUNS,
        "dispatch_recv leaves dispatch_arrived counting: the next op on the half reads rows before they land",
        "low_latency"),
    Mutant(
        "ll_combine_reads_unwaited", LOW_LATENCY,
        [("      if (valid) {\n        valid = wait_at_least(l.combine_arrived(",
          "      if (false) {\n        valid = wait_at_least(l.combine_arrived(")],
        [("thread", LL_TSAN), ("plain", LL_PLAIN_PUT, SLOW_NETWORK)],
        "combine_recv sums rows without waiting for them to arrive", "low_latency"),
    Mutant(
        "ll_combine_unweighted", LOW_LATENCY,
        [("acc[j] = __fadd_rn(acc[j], __fmul_rn(w, v[j]));", "acc[j] = __fadd_rn(acc[j], v[j]);")],
        [("plain", LL_PLAIN)],
        "combine_recv ignores the top-k weights", "low_latency"),
    Mutant(
        "ll_scales_row_major", LOW_LATENCY,
        [("out[(local_expert * num_scales + j) * rows_per_expert + row] = __ldcg(scales + j);",
          "out[(local_expert * rows_per_expert + row) * num_scales + j] = __ldcg(scales + j);")],
        [("plain", LL_PLAIN)],
        "FP8 float32 scales written row-major instead of the documented column-major layout", "low_latency"),

    # ---- internode (csrc/kernels/internode.cu and its layout) ----
    Mutant(
        "in_arrival_any_lap", IN_LAYOUT,
        [("  return tag_epoch(word) == epoch && (value >> 16) == (uint32_t(position / capacity) & 0xffffu) ?",
          "  return tag_epoch(word) == epoch ?")],
        [("plain", IN_SLOW, SLOW_NETWORK), ("plain", IN_SLOW + IN_TINY_RINGS + ["--seed", "2"], SLOW_NETWORK)],
        "a reader takes an arrival word of the ring's previous lap: slots not yet rewritten read as delivered",
        "internode"),
    Mutant(
        "in_arrival_any_call", IN_LAYOUT,
        [("  return tag_epoch(word) == epoch && (value >> 16)", "  return (value >> 16)")],
        [("plain", IN_SLOW, SLOW_NETWORK), ("plain", IN_PLAIN, SLOW_NETWORK)],
        "a reader takes an arrival word of an earlier call: the previous call's slots read as delivered",
        "internode"),
    Mutant(
        "in_publish_without_fence", INTERNODE,
        [("        ptx::fence_acq_rel_sys();  // staged bytes visible to whoever executes the put\n", ""),
         ("      if (lane == 0) st_release_u64(arrival + begin, word);",
          "      if (lane == 0) st_relaxed_u64(arrival + begin, word);")],
        [("thread", IN_TSAN)],
        "dispatch publishes the slots it wrote in place with neither a fence nor a release before the arrival "
        "word: the reader may see the word before the slots", "internode"),
    Mutant(
        "in_forward_past_tail", INTERNODE,
        [("      while (consumed < tail && consumed - batch_begin < a.nvl_chunk) {\n",
          "      while (consumed < max(tail, total) && consumed - batch_begin < a.nvl_chunk) {\n")],
        [("plain", IN_SLOW, SLOW_NETWORK), ("plain", IN_SLOW + ["--seed", "2"], SLOW_NETWORK),
         ("plain", IN_CREDIT_ORDER + ["--seed", "3"], SLOW_NETWORK), ("thread", IN_TSAN)],
        "the dispatch forwarder copies slots up to the announced total without waiting for the tail", "internode"),
    Mutant(
        "in_arrival_not_acquired", INTERNODE,
        [("    for (int n; (n = arrival_slots(network_signal(words + f % capacity), epoch, f, capacity)) > 0;) f += n;",
          "    for (int n; (n = arrival_slots(ptx::ld_relaxed_sys(reinterpret_cast<const unsigned long long*>(words + "
          "f % capacity)), epoch, f, capacity)) > 0;) f += n;")],
        [("thread", IN_TSAN)],
        "the dispatch forwarder reads the arrival words relaxed: the slots it then copies are not acquired",
        "internode"),
    Mutant(
        "in_rdma_credit_plus_one", INTERNODE,
        [("uint64_t(consumed - batch_begin), NVSHMEM_SIGNAL_ADD, source);",
          "uint64_t(consumed - batch_begin + 1), NVSHMEM_SIGNAL_ADD, source);")],
        # Only a full ring shows the extra credit: tiny rings, several schedules.
        [("plain", IN_PLAIN + IN_TINY_RINGS),
         ("plain", IN_PLAIN + IN_TINY_RINGS + ["--seed", "2"], {"EP_COMM_EMU_SCHEDULE": "random:2"}),
         ("plain", IN_PLAIN + IN_TINY_RINGS + ["--seed", "3"], {"EP_COMM_EMU_SCHEDULE": "reverse"}),
         ("thread", IN_TSAN + IN_TINY_RINGS), ("plain", IN_PLAIN)],
        "the dispatch forwarder hands back one RDMA slot more than it consumed: the sender overwrites a slot "
        "still unread", "internode"),
    Mutant(
        "in_nvl_credit_plus_one", INTERNODE,
        [("s / L, c),\n                         make_tag(epoch, uint32_t(consumed)));",
          "s / L, c),\n                         make_tag(epoch, uint32_t(consumed + 1)));")],
        [("plain", IN_PLAIN),
         ("plain", IN_PLAIN + IN_TINY_RINGS + ["--seed", "2"], {"EP_COMM_EMU_SCHEDULE": "random:2"}),
         ("thread", IN_TSAN + IN_TINY_RINGS)],
        "the dispatch receiver releases one NVL slot more than it read", "internode"),
    Mutant(
        "in_combine_credit_plus_one", INTERNODE,
        [("uint64_t(added), NVSHMEM_SIGNAL_ADD, n * L + my_local);",
          "uint64_t(added + 1), NVSHMEM_SIGNAL_ADD, n * L + my_local);")],
        [("plain", IN_PLAIN + IN_TINY_RINGS), ("thread", IN_TSAN + IN_TINY_RINGS)],
        "the combine receiver hands back one RDMA slot more than it read: the forwarder overwrites a partial "
        "still unread", "internode"),
    Mutant(
        "in_combine_credit_set", INTERNODE,
        [("uint64_t(added), NVSHMEM_SIGNAL_ADD, n * L + my_local);",
          "uint64_t(sh.recv_base[n]), NVSHMEM_SIGNAL_SET, n * L + my_local);")],
        [("plain", IN_CREDIT_ORDER + ["--seed", "1"], SLOW_NETWORK),
         ("plain", IN_CREDIT_ORDER + ["--seed", "2"], SLOW_NETWORK),
         ("plain", IN_CREDIT_ORDER + ["--seed", "3"], SLOW_NETWORK), ("plain", IN_CREDIT_ORDER + ["--seed", "4"]),
         ("plain", IN_CREDIT_ORDER + ["--seed", "5"], {"EP_COMM_EMU_SCHEDULE": "random:5", **SLOW_NETWORK}),
         ("plain", IN_CREDIT_ORDER + ["--seed", "6"], {"EP_COMM_EMU_SCHEDULE": "random:6"})],
        "the combine receiver SETs its running credit instead of adding: two SETs may land in either order, the "
        "credit goes back and the forwarder stalls", "internode"),
    Mutant(
        "in_put_wrong_node", INTERNODE,
        [("lay.rdma_recv(my_node, c),\n                        reinterpret_cast<uint64_t*>(cm.buffer + lay.rdma_arrival(my_node, c)), "
          "slot_bytes, capacity", "lay.rdma_recv(n, c),\n                        reinterpret_cast<uint64_t*>(cm.buffer + "
          "lay.rdma_arrival(n, c)), slot_bytes, capacity")],
        [("plain", IN_PLAIN)],
        "dispatch puts into the forwarder's ring of the destination node instead of the source node's", "internode"),
    Mutant(
        "in_combine_drop_bias1", INTERNODE,
        [("        if (bias1 != nullptr) {\n", "        if (bias1 != nullptr && false) {\n")],
        [("plain", IN_PLAIN)],
        "internode combine ignores the second bias", "internode"),
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


def run_driver(driver: str, args: Sequence[str], limit_s: int, log_path: str,
               extra_env: Optional[Dict[str, str]] = None) -> Tuple[int, str, float]:
    env = dict(os.environ)
    env.update(SANITIZER_ENV)
    env.update(extra_env or {})
    start = time.monotonic()
    try:
        proc = subprocess.run(["timeout", "-k", "5", str(limit_s), driver] + list(args), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        rc, out = proc.returncode, proc.stdout
    except OSError as e:
        rc, out = 127, str(e)
    with open(log_path, "w") as f:
        settings = " ".join(f"{k}={v}" for k, v in (extra_env or {}).items())
        f.write(f"$ {settings + ' ' if settings else ''}{driver} {' '.join(args)}\n{out}\nexit status {rc}\n")
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
    parser.add_argument("--family", choices=sorted(emu_build.DRIVERS), help="only the mutants of this kernel family")
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
    if args.family:
        mutants = [m for m in mutants if m.driver == args.family]
    if args.variants or args.seed is not None:
        keep = set(args.variants.split(",")) if args.variants else set(emu_build.VARIANTS)
        extra = ["--seed", str(args.seed)] if args.seed is not None else []
        mutants = [replace(m, runs=[(v, a + extra, env) for v, a, env in map(run_parts, m.runs) if v in keep])
                   for m in mutants]
        mutants = [m for m in mutants if m.runs]
    if args.list:
        for m in mutants:
            print(f"{m.name:26s} csrc/{m.file:40s} {', '.join(run_parts(r)[0] for r in m.runs):16s} {m.what}")
        return 0

    problems = check_patterns(mutants)
    if problems:
        print("emu_mutants: the kernels changed; update these mutants:\n" + "\n".join(problems), file=sys.stderr)
        return 1

    t_start = time.monotonic()
    logs = os.path.join(ROOT, "build", "emu-check", "logs", "mutants")
    os.makedirs(logs, exist_ok=True)
    variants = sorted({run_parts(r)[0] for m in mutants for r in m.runs}, key=emu_build.VARIANTS.index)

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
    cases: List[Tuple[str, Run]] = []
    for m in mutants:
        for r in m.runs:
            if (m.driver, r) not in cases:
                cases.append((m.driver, r))
    for i, (d, r) in enumerate(cases):
        v, a, env = run_parts(r)
        rc, out, secs = run_driver(emu_build.driver_path(base[v], d), a, args.limit_s,
                                   os.path.join(logs, f"unmutated-{d}-{v}-{i}.log"), env)
        verdict = classify(rc, out)
        print(f"unmutated {d:11s} {v:7s} {run_text(r)}: {'ok' if verdict is None else 'FAILED: ' + verdict} "
              f"({secs:.0f} s)", flush=True)
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
                for run_index, r in enumerate(m.runs):
                    v, a, env = run_parts(r)
                    build_dir = os.path.join(ROOT, "build", "emu-check", "mutants", v)
                    try:
                        driver = emu_build.build_from_copy(v, base[v], copy_csrc, [m.file], build_dir, m.driver)
                    except (subprocess.CalledProcessError, SystemExit) as e:
                        print(f"mutant {m.name}: the build failed ({e}); fix the mutant")
                        caught.append(f"build failure ({v})")
                        ok = False
                        break
                    rc, out, secs = run_driver(driver, a, args.limit_s,
                                               os.path.join(logs, f"{m.name}-{run_index}-{v}.log"), env)
                    verdict = classify(rc, out)
                    print(f"  {m.name} [{v}] {run_text(r)}: {verdict or 'SURVIVED'} ({secs:.0f} s)", flush=True)
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
