#!/usr/bin/env bash
# One GPU session (one H200, <= 10 minutes): the correctness suite on every kernel path, the
# kernel benchmarks on a reduced shape set, and the quick end-to-end measurement. Each part
# writes its JSON to benchmarks/results/ and logs to $OUT (or benchmarks/results/) on its own:
# a failing or timed-out part does not stop the next. Needs torch, triton, diffusers and pytest.
#
#     bash benchmarks/gpu_session.sh            # from the repository root
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
results=benchmarks/results
logs="${OUT:-$results}"
mkdir -p "$results" "$logs"
card=$(python3 -c "import re, torch; n = torch.cuda.get_device_name().lower(); m = re.search(r'(h100|h200|a100|l40s|b200|gh200)', n); print(m.group(1) if m else re.sub(r'[^a-z0-9]+', '_', n).strip('_'))")
status=0

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

part check_gpu 150 python3 benchmarks/check_gpu.py --out "$results/check_gpu_$card.json"
part bench_kernels 180 python3 benchmarks/bench_kernels.py --quick --out "$results/kernels_quick_$card.json"
part bench_e2e 240 python3 benchmarks/bench_e2e.py --quick --models 14b-720p,hunyuan-720p \
  --precisions native,fp8 --out "$results/e2e_quick_$card.json"
cp "$results"/check_gpu_"$card".json "$results"/kernels_quick_"$card".json "$results"/e2e_quick_"$card".json "$logs"/ 2>/dev/null
exit $status
