#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call, from the repository root:
#   OUT=/some/dir scripts/gpu_check.sh
# Each step's output goes to $OUT/<step>.log and its exit code to $OUT/summary.txt. A failing
# step does not stop the others; the script exits nonzero if any step failed.
# Knobs: EP_COMM_CUDA_ARCHS (default 90a), STEP_TIMEOUT seconds per step (default 300; a device command may run 600 s, so split
#   long runs: GPU_CHECK_ONLY="gpu-intranode bench" runs just the named steps).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
failed=0

# step NAME CMD...: run CMD with a time limit, tee its output to $OUT/NAME.log, record rc.
step() {
  local name=$1; shift
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY build import " != *" $name "* ]]; then return 0; fi
  local start=$SECONDS rc
  echo "=== [$name] $*"
  timeout -k 10 "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
}

step nvidia-smi nvidia-smi
step env bash -c 'nvcc --version; python --version; python -c "import torch; print(\"torch\", torch.__version__, torch.version.cuda)"; python -m pip list 2>/dev/null | grep -i -E "nvshmem|torch|pybind11|ninja|cupy|nccl"'

# No network on the GPU machine: everything is preinstalled, so no dependency resolution.
step build env EP_COMM_CUDA_ARCHS="${EP_COMM_CUDA_ARCHS:-90a}" \
  EP_COMM_MAX_JOBS="${EP_COMM_MAX_JOBS:-$(nproc)}" \
  python -m pip install -v -e . --no-build-isolation --no-deps
step import python -c "import ep_comm._C as c; print(c.build_info(), 'devices:', c.device_count()); print(c.get_device_properties(0))"

# One step per family, smallest worlds first, so one hang costs one step, not the whole budget.
for family in intranode low_latency internode; do
  step "gpu-$family" python -m pytest -v -x "tests/gpu/test_$family.py"
done
step gpu-microbench python -m pytest -v tests/test_microbench_bindings.py

# One small case of each kernel family under compute-sanitizer (ranks are spawned processes).
if command -v compute-sanitizer >/dev/null 2>&1 && [ -z "${SKIP_SANITIZER:-}" ]; then
  for tool in memcheck racecheck synccheck; do
    step "sanitizer-$tool" compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 1 \
      python -m pytest -x -q tests/gpu/test_intranode.py::test_intranode_matches_reference[2] \
      "tests/gpu/test_low_latency.py::test_low_latency_against_reference[2]" \
      "tests/gpu/test_internode.py::test_internode_matches_reference[4-2]"
  done
fi

# Benchmarks: one entry point, python -m ep_comm.bench (BENCHMARKS.md); JSON and charts land in $OUT
# (charts only where matplotlib is installed: --plot refuses to start without it).
PLOT_ARGS=()
python -c "import matplotlib" 2>/dev/null && PLOT_ARGS=(--plot "$OUT/plots")
step bench python -m ep_comm.bench --graph --json "$OUT/bench.json"
step bench-skew python -m ep_comm.bench --model deepseek-v3 --routing zipf:1.2 --json "$OUT/bench_zipf.json"
step bench-sweep python -m ep_comm.bench --sweep tokens --json "$OUT/bench_sweep.json" ${PLOT_ARGS[@]+"${PLOT_ARGS[@]}"}
step bench-interconnect python -m ep_comm.bench interconnect --json "$OUT/interconnect.json" \
  ${PLOT_ARGS[@]+"${PLOT_ARGS[@]}"}

echo "=== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$failed"
