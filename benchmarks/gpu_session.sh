#!/usr/bin/env bash
# The GPU checks and benchmarks of the kernels, on one H200: the correctness suite on every
# kernel path, the kernel benchmarks on a reduced shape set, and the quick end-to-end measurement;
# and the medium embedded model's shipped sample capture, frame strips and claims report.
# Each part writes its JSON to benchmarks/results/ and logs to $OUT (or benchmarks/results/) on
# its own: a failing or timed-out part does not stop the next. Needs torch, triton, diffusers,
# plotly (check_gpu's CUDA tests open a capture through dfsviz.open) and pytest. Measured on one H200: check_gpu takes over 5 minutes on a fresh machine (Triton compiles
# every autotune candidate first) and 2.5 on one that ran it before; bench_kernels --quick about 3;
# bench_e2e --quick about 3.5 per model. With a 10-minute limit per device call, run one part per call:
#
#     bash benchmarks/gpu_session.sh check_gpu          # from the repository root
#     bash benchmarks/gpu_session.sh check_gpu_fp8
#     bash benchmarks/gpu_session.sh bench_kernels
#     bash benchmarks/gpu_session.sh bench_kernels_fp8    # the FP8 speed table of docs/kernels.md, about 3 minutes
#     bash benchmarks/gpu_session.sh bench_e2e
#     bash benchmarks/gpu_session.sh e2e_wan14b            # full depth, each about 6-7 minutes:
#     bash benchmarks/gpu_session.sh e2e_wan14b_fp8        # the end-to-end figures the docs quote
#     bash benchmarks/gpu_session.sh e2e_hunyuan
#     bash benchmarks/gpu_session.sh e2e_hunyuan_fp8
#     bash benchmarks/gpu_session.sh bench_candidates quality_precisions   # one call, about 7 minutes
#     bash benchmarks/gpu_session.sh bench_fp8_linear                       # about 1 minute
#     bash benchmarks/gpu_session.sh medium_sample medium_strips medium_claims   # one call, about 8 minutes
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
results=benchmarks/results
logs="${OUT:-$results}"
mkdir -p "$results" "$logs"
card=$(python3 -c "import re, torch; n = torch.cuda.get_device_name().lower(); m = re.search(r'(h100|h200|a100|l40s|b200|gh200)', n); print(m.group(1) if m else re.sub(r'[^a-z0-9]+', '_', n).strip('_'))")
status=0
parts=" ${*:-check_gpu check_gpu_fp8 bench_kernels bench_e2e} "
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

want check_gpu && part check_gpu 560 python3 benchmarks/check_gpu.py --only attention candidates cuda_tests nan errors \
  scores_stats qk_norm_rope adaln fp8_linear --out "$results/check_gpu_$card.json"
# the FP8 checks (the fp8 group alone: 205 s on a fresh H200), then every FP8 descriptor candidate on its own
want check_gpu_fp8 && part check_gpu_fp8 560 python3 benchmarks/check_gpu.py --only fp8 fp8_candidates \
  --out "$results/check_gpu_fp8_$card.json"
want bench_kernels && part bench_kernels 300 python3 benchmarks/bench_kernels.py --quick --out "$results/kernels_quick_$card.json"
want bench_kernels_fp8 && part bench_kernels_fp8 400 python3 benchmarks/bench_kernels.py --sections fp8 \
  --shapes wan1.3b-480p wan14b-720p --batches 1 --out "$results/kernels_fp8_sm90_$card.json"
want bench_e2e && part bench_e2e 560 python3 benchmarks/bench_e2e.py --quick --models 14b-720p,hunyuan-720p \
  --precisions native,fp8_pv_dense+linear_fp8 --out "$results/e2e_quick_$card.json"
# Every call at full depth, one model per device call (the results file is rewritten after each
# measurement, so a part cut off by its limit keeps what it measured): bf16 with stock and with
# kernel warm-up calls (their sparse calls timed once), and FP8 attention with FP8 linear layers.
e2e_full() {  # e2e_full PART MODEL REPS PRECISIONS RESULT
  want "$1" && part "$1" 580 python3 benchmarks/bench_e2e.py --models "$2" --modes permute_once --reps "$3" \
    --dense cudnn --quality "" --precisions "$4" --out "$results/$5_$card.json"
}
e2e_full e2e_wan14b 14b-720p 2 native,native_dense e2e_native_dense
e2e_full e2e_wan14b_fp8 14b-720p 2 native,fp8_pv_dense+linear_fp8 e2e_linear_fp8
e2e_full e2e_hunyuan hunyuan-720p 1 native,native_dense e2e_hunyuan_full
e2e_full e2e_hunyuan_fp8 hunyuan-720p 1 fp8_pv_dense+linear_fp8 e2e_hunyuan_full_fp8
want bench_candidates && part bench_candidates 420 python3 benchmarks/bench_kernels.py --sections candidates \
  --batches 1 --gammas 0.2 --skip-fa2 --out "$results/kernels_candidates_$card.json"
want quality_precisions && part quality_precisions 240 python3 benchmarks/quality_embedded.py --part precisions \
  --device cuda --out "$results/quality_precisions_$card.json"
want bench_fp8_linear && part bench_fp8_linear 240 python3 benchmarks/bench_fp8_linear.py \
  --out "$results/fp8_linear_$card.json"
# The medium model's sample: one layer, all heads, three steps of the 20, float16 maps, dfs_tile scores
# (about 12 MB: what the repository can hold); strips: docs/img/embedded_medium-wan_<class>.png.
want medium_sample && part medium_sample 240 python3 -m dfsviz capture --model dfsviz-embedded:medium --layers 3 \
  --capture-steps 0,10,19 --methods dfs_tile --map-dtype float16 --overwrite --out "$logs/medium-wan-sample.h5"
want medium_strips && part medium_strips 240 bash -c "python3 -m dfsviz.models.sampler --model dfsviz/data/models/medium-wan \
  --out-dir /tmp/medium_strips && tar -cf '$logs/medium_strips.tar' -C /tmp/medium_strips ."
want medium_claims && part medium_claims 420 bash -c "python3 -m dfsviz capture --model dfsviz-embedded:medium --orders all \
  --layers 1,3,5,7 --capture-steps 0,5,10,15,19 --save-qkv 3 --qkv-steps 10 --overwrite --out /tmp/medium_all.h5 && \
  python3 benchmarks/claims.py --model medium --capture /tmp/medium_all.h5 --sample '$logs/medium-wan-sample.h5' \
  --out '$results/claims_medium.json'"
# Beside the logs, the results of the parts that ran (the device tool brings back at most 8 files).
if [ "$logs" != "$results" ]; then
  want check_gpu && cp "$results/check_gpu_$card.json" "$logs"/
  want check_gpu_fp8 && cp "$results/check_gpu_fp8_$card.json" "$logs"/
  want bench_kernels && cp "$results/kernels_quick_$card.json" "$logs"/
  want bench_e2e && cp "$results/e2e_quick_$card.json" "$logs"/
  want e2e_wan14b && cp "$results/e2e_native_dense_$card.json" "$logs"/
  want e2e_wan14b_fp8 && cp "$results/e2e_linear_fp8_$card.json" "$logs"/
  want e2e_hunyuan && cp "$results/e2e_hunyuan_full_$card.json" "$logs"/
  want e2e_hunyuan_fp8 && cp "$results/e2e_hunyuan_full_fp8_$card.json" "$logs"/
  want bench_candidates && cp "$results/kernels_candidates_$card.json" "$logs"/
  want quality_precisions && cp "$results/quality_precisions_$card.json" "$logs"/
  want bench_fp8_linear && cp "$results/fp8_linear_$card.json" "$logs"/
  want medium_claims && cp "$results/claims_medium.json" "$logs"/
fi
exit $status
