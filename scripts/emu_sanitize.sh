#!/usr/bin/env bash
# The intranode, low-latency and internode kernels on the emulated device, ranks as threads of one process,
# under AddressSanitizer+UBSan and ThreadSanitizer (and plain, with varied fiber schedules).
#
#   scripts/emu_sanitize.sh [plain] [address] [thread]     (default: all three)
#
# Builds tests/emulator/{intranode,low_latency,internode}_driver per variant in build/emu-check/<variant>/
# (ninja: only what changed is recompiled; see scripts/emu_build.py), runs small cases, and exits
# nonzero on any mismatch, sanitizer report, emulated-device fault or timeout. Logs:
# build/emu-check/logs/. Rank processes (tests/gpu/ on the emulator) cannot show cross-rank races to
# TSan; one process with ranks as threads can (cudaIpcOpenMemHandle returns the peer's pointer, and
# every emulated NVSHMEM PE's heap is mapped once). Low-latency cases run both transports: P2P
# (direct stores and atomics into peers' heaps) and --p2p 0 (NVSHMEM_DISABLE_P2P=1: every row a
# put-with-signal, delivered late and out of order by the emulated network).
#
# TSan: g++-12's libtsan is precise but slow (~10-15 s and ~2-3 GB per call with 2 ranks): keep its
# cases few and small. No suppressions: every access the kernels make is ordered by an
# acquire/release pair, a block barrier, a named barrier, __syncwarp, or a fence next to a relaxed
# atomic (which the emulator models for TSan, see NOTES.md), and TSan sees all of those.
#
# The sanitized ep_comm._C_emu (EP_COMM_EMU_SANITIZE=address|thread when building) is loaded by an
# uninstrumented Python, so the sanitizer's runtime must be preloaded, e.g.
#   LD_PRELOAD=$(g++ -print-file-name=libtsan.so) python -m pytest tests/gpu/test_intranode.py
#   LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 python -m pytest ...
#   (libstdc++ too: without it ASan's __cxa_throw interceptor aborts at the first C++ exception)
# but there every rank is its own process, so TSan sees no cross-rank sharing: that is what the
# in-process driver here is for.
set -uo pipefail

cd "$(dirname "$0")/.."
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(plain address thread)

# halt_on_error: the first report ends the run (nonzero). ASan: fibers switch stacks (the emulator
# tells ASan), so fake stacks for use-after-return stay off. TSan: exitcode 66 also when a report
# did not halt (e.g. a report from a thread that exits).
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=0:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0"
# The kernels' own timeout (the driver's --timeout-s, 20 s) ends a hang first, naming rank, phase
# and peer; the emulator's hang limit (EP_COMM_EMU_HANG_S) is the backstop.
export EP_COMM_EMU_HANG_S="${EP_COMM_EMU_HANG_S:-60}"

LOGS=build/emu-check/logs
mkdir -p "$LOGS"
FAILED=0
START=$SECONDS

build() {
  if ! python3 scripts/emu_build.py --variant "$1" >"$LOGS/build-$1.log" 2>&1; then
    echo "FAIL build $1 (see $LOGS/build-$1.log)"
    tail -20 "$LOGS/build-$1.log"
    FAILED=1
    return 1
  fi
}

# EMU_SANITIZE_DRIVERS="internode" (space separated) runs only those drivers' cases.
DRIVERS="${EMU_SANITIZE_DRIVERS:-intranode low_latency internode}"

# run VARIANT LIMIT_S NAME [ENV=VALUE ...] -- DRIVER_ARGS...   (the driver: $DRIVER)
DRIVER=intranode
run() {
  local variant=$1 limit=$2 name=$3
  shift 3
  case " $DRIVERS " in *" $DRIVER "*) ;; *) return 0 ;; esac
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local log="$LOGS/$variant-$name.log" t0=$SECONDS rc
  env "${envs[@]}" timeout -k 5 "$limit" "build/emu-check/$variant/${DRIVER}_driver" "$@" >"$log" 2>&1
  rc=$?
  local why=""
  if grep -q "WARNING: ThreadSanitizer" "$log"; then why="ThreadSanitizer report"
  elif grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$log"; then why="AddressSanitizer/UBSan report"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="no result within ${limit} s"
  elif [ $rc -ne 0 ]; then why="exit status $rc"
  fi
  if [ -n "$why" ]; then
    echo "FAIL $variant $name ($((SECONDS - t0)) s): $why; ${envs[*]} build/emu-check/$variant/${DRIVER}_driver $*"
    grep -E "MISMATCH|ERROR|FAULT|TIMEOUT|WARNING: |SUMMARY|runtime error" "$log" | head -15 | sed 's/^/    /'
    echo "    log: $log"
    FAILED=1
  else
    echo "ok   $variant $name ($((SECONDS - t0)) s)"
  fi
}

for v in "${VARIANTS[@]}"; do
  case $v in
    plain|address|thread) ;;
    *) echo "unknown variant $v (plain, address, thread)"; exit 2 ;;
  esac
  build "$v" || continue
  DRIVER=intranode
  case $v in
    plain)
      for seed in 1 2 3; do
        run plain 120 "r2-seed$seed" -- --ranks 2 --seed $seed --iterations 2
        run plain 120 "r3-seed$seed" -- --ranks 3 --seed $seed --tokens 32 --hidden 256 --iterations 2
      done
      run plain 120 r3-random-abort EP_COMM_EMU_SCHEDULE=random:7 -- --ranks 3 --seed 11 --tokens 32 --cases all,abort
      run plain 120 r3-reverse-sync EP_COMM_EMU_SCHEDULE=reverse -- --ranks 3 --seed 12 --sync-each
      run plain 120 r2-c1-slots2 -- --ranks 2 --seed 13 --channels 1 --slots 2
      run plain 120 r4-c3 -- --ranks 4 --seed 14 --channels 3 --slots 6 --tokens 20
      # several notify tiles (256 tokens) and warps per channel
      run plain 120 r2-long -- --ranks 2 --seed 16 --channels 2 --slots 8 --tokens 600
      run plain 180 r8 -- --ranks 8 --seed 15 --tokens 16 --channels 2
      ;;
    address)
      run address 180 r2 -- --ranks 2 --seed 21 --iterations 2
      run address 180 r3-random-abort EP_COMM_EMU_SCHEDULE=random:3 -- --ranks 3 --seed 22 --tokens 32 --hidden 256 --cases all,abort
      ;;
    thread)
      run thread 300 r2 -- --ranks 2 --seed 31 --timeout-s 60
      run thread 300 r3-bf16-abort -- --ranks 3 --seed 32 --cases bf16,abort --channels 1 --tokens 32 --timeout-s 60 --abort-timeout-s 10
      # rounds of one row: every head release is waited for (see scripts/emu_mutants.py)
      run thread 300 r2-random EP_COMM_EMU_SCHEDULE=random:5 -- --ranks 2 --seed 34 --tokens 32 --timeout-s 60
      run thread 300 r2-row-ring -- --ranks 2 --seed 33 --cases bf16 --channels 1 --tokens 64 --slots 2 --timeout-s 60
      ;;
  esac
  # Low-latency: every case (bf16, fp8, zero-copy, two dispatches in a row, two ops in flight, a
  # hot expert with every slot used) per run; --p2p 1 direct stores, --p2p 0 NVSHMEM puts.
  DRIVER=low_latency
  case $v in
    plain)
      for p2p in 1 0; do
        for seed in 1 2; do run plain 60 "ll-r2-p2p$p2p-seed$seed" -- --ranks 2 --p2p $p2p --seed $seed; done
        run plain 60 "ll-r3-all-p2p$p2p" -- --ranks 3 --p2p $p2p --seed 3 --tokens 20 --hidden 512 --cases all
        run plain 120 "ll-r8-p2p$p2p" -- --ranks 8 --p2p $p2p --seed 4 --tokens 8 --experts 16 --topk 5
      done
      # fibers in random / reverse order, puts delivered after up to 1 ms, few SMs (several tokens
      # per block), a host sync after every kernel
      run plain 60 ll-r4-random-slow-put EP_COMM_EMU_SCHEDULE=random:9 EP_COMM_EMU_NVSHMEM_DELAY_US=1000 -- --ranks 4 --p2p 0 --seed 5 --experts 8 --topk 4
      run plain 60 ll-r3-reverse-sync EP_COMM_EMU_SCHEDULE=reverse -- --ranks 3 --p2p 1 --seed 6 --sync-each
      run plain 60 ll-r2-sms2 EP_COMM_EMU_SCHEDULE=random:4 -- --ranks 2 --p2p 1 --seed 7 --sms 2 --tokens 40
      # ranks 1 and 2 launch their sends 1 and 2 ms late: receivers wait for rows that land later
      run plain 60 ll-r3-skew -- --ranks 3 --p2p 1 --seed 8 --skew-us 1000
      run plain 60 ll-r3-skew-put -- --ranks 3 --p2p 0 --seed 8 --skew-us 1000
      ;;
    address)
      run address 120 ll-r2-p2p -- --ranks 2 --p2p 1 --seed 21
      run address 120 ll-r3-all-put EP_COMM_EMU_SCHEDULE=random:3 -- --ranks 3 --p2p 0 --seed 22 --hidden 512 --cases all
      ;;
    thread)
      # 4 emulated SMs: a few blocks per kernel (cross-block hand-offs), few fibers for TSan
      run thread 300 ll-r2-p2p -- --ranks 2 --p2p 1 --seed 31 --sms 4 --tokens 8 --cases bf16,double,inflight --timeout-s 60
      run thread 300 ll-r2-put -- --ranks 2 --p2p 0 --seed 32 --sms 4 --tokens 8 --cases bf16,double,inflight --timeout-s 60
      run thread 300 ll-r3-p2p -- --ranks 3 --p2p 1 --seed 33 --sms 4 --tokens 6 --cases fp8,zerocopy,full --timeout-s 60
      run thread 300 ll-r3-put-random EP_COMM_EMU_SCHEDULE=random:6 -- --ranks 3 --p2p 0 --seed 34 --sms 4 --tokens 6 --cases inflight,full --timeout-s 60
      ;;
  esac
  # Internode: ranks on emulated nodes (--per-node L: nvshmem_ptr maps same-node peers only, so the
  # NVLink leg stores and the RDMA leg puts); every run has the cases bf16, fp8, cached, worst on
  # one buffer, rings of 8 RDMA / 2 NVL slots (they wrap) unless said.
  DRIVER=internode
  case $v in
    plain)
      run plain 60 in-r4-2x2 -- --ranks 4 --per-node 2 --seed 1
      run plain 60 in-r8-2x4 -- --ranks 8 --per-node 4 --seed 2 --tokens 16
      run plain 60 in-r8-4x2 -- --ranks 8 --per-node 2 --seed 3 --tokens 16
      run plain 60 in-r4-4x1-wide EP_COMM_EMU_SCHEDULE=random:5 -- --ranks 4 --per-node 1 --seed 4 --hidden 128 --topk 8 --experts 32
      # fibers in random order and puts that linger up to 1 ms; smallest rings and chunks, 3 channels
      run plain 60 in-r4-2x2-float-partials -- --ranks 4 --per-node 2 --seed 7 --float-partials
      run plain 60 in-r4-random-slow-net EP_COMM_EMU_SCHEDULE=random:7 EP_COMM_EMU_NVSHMEM_DELAY_US=1000 -- --ranks 4 --per-node 2 --seed 5
      run plain 60 in-r6-3x2-tiny-rings EP_COMM_EMU_SCHEDULE=reverse -- --ranks 6 --per-node 2 --seed 6 --ring-tokens 2 --rdma-chunk 1 --nvl-chunk 1 --channels 3 --sync-each
      # top-2 over 2 x 4 ranks with the smallest rings: many credit signals in flight to one forwarder,
      # delivered in any order (credits that were SET, not added, went back and stalled combine)
      for seed in 1 2; do
        run plain 60 in-r8-2x4-credits-seed$seed -- --ranks 8 --per-node 4 --seed $seed --tokens 37 --topk 2 --experts 32 --channels 2 --ring-tokens 2 --rdma-chunk 1 --nvl-chunk 1
      done
      ;;
    address)
      run address 120 in-r4-2x2-random EP_COMM_EMU_SCHEDULE=random:3 -- --ranks 4 --per-node 2 --seed 21
      run address 120 in-r6-2x3-slow-net EP_COMM_EMU_NVSHMEM_DELAY_US=1000 -- --ranks 6 --per-node 3 --seed 22 --tokens 12 --ring-tokens 3
      ;;
    thread)
      # one channel, few tokens: ~1-2 GB and 10-20 s each with g++-12's libtsan
      # rings of 2 dispatch slots (combine's RDMA ring: 1): every credit is waited for
      run thread 300 in-r2-2x1-tiny-rings -- --ranks 2 --per-node 1 --seed 31 --channels 1 --tokens 8 --ring-tokens 2 --rdma-chunk 1 --nvl-chunk 1 --timeout-s 60
      run thread 300 in-r4-2x2-random EP_COMM_EMU_SCHEDULE=random:6 -- --ranks 4 --per-node 2 --seed 32 --channels 1 --tokens 6 --timeout-s 60
      ;;
  esac
done

if [ $FAILED -ne 0 ]; then
  echo "emu_sanitize: FAILED ($((SECONDS - START)) s)"
  exit 1
fi
echo "emu_sanitize: all passed ($((SECONDS - START)) s)"
