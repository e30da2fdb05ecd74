#!/usr/bin/env bash
# The GPU checks and benchmarks of the kernels, on one H200: the correctness suite on every
# kernel path, the kernel benchmarks on a reduced shape set, and the quick end-to-end measurement.
# Each part writes its JSON to benchmarks/results/ and logs to $OUT (or benchmarks/results/) on
# its own: a failing or timed-out part does not stop the next. Needs torch, triton, diffusers and
# pytest. Measured on one H200: check_gpu takes over 5 minutes on a fresh machine (Triton compiles
# every autotune candidate first) and 2.5 on one that ran it before; bench_kernels --quick about 3;
# bench_e2e --quick about 3.5 per model. With a 10-minute limit per device call, run one part per call:
#
#     bash benchmarks/gpu_session.sh check_gpu          # from the repository root
#     bash benchmarks/gpu_session.sh bench_kernels
#     bash benchmarks/gpu_session.sh bench_e2e
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
results=benchmarks/results
logs="${OUT:-$results}"
mkdir -p "$results" "$logs"
card=$(python3 -c "import re, torch; n = torch.cuda.get_device_name().lower(); m = re.search(r'(h100|h200|a100|l40s|b200|gh200)', n); print(m.group(1) if m else re.sub(r'[^a-z0-9]+', '_', n).strip('_'))")
status=0
parts=" ${*:-check_gpu bench_kernels bench_e2e} "
want() { [[ "$parts" == *" $1 "* ]]; }

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log, keep going
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s (log $logs/$name.log)"
  tail -n 25 "$logs/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

want check_gpu && part check_gpu 560 python3 benchmarks/check_gpu.py --out "$results/check_gpu_$card.json"
want bench_kernels && part bench_kernels 300 python3 benchmarks/bench_kernels.py --quick --out "$results/kernels_quick_$card.json"
want bench_e2e && part bench_e2e 560 python3 benchmarks/bench_e2e.py --quick --models 14b-720p,hunyuan-720p \
  --precisions native,fp8 --out "$results/e2e_quick_$card.json"
cp "$results"/check_gpu_"$card".json "$results"/kernels_quick_"$card".json "$results"/e2e_quick_"$card".json "$logs"/ 2>/dev/null
exit $status
