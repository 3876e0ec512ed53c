#!/usr/bin/env bash
# The GPU acceptance run: one command that turns a device lease (one H100/H200,
# no network) into checked figures, in at most 8 minutes (docs/performance.md,
# "GPU acceptance"). Rehearsed on CPU in CI with --cpu-smoke.
#
#   bash scripts/gpu_acceptance.sh [--cpu-smoke] [--out DIR] [--stages a,b] [--budget SECONDS]
#                                  [--stage-limit SECONDS] [--work DIR]
#
# Stages, in this order, each time-boxed (`timeout`, its own cap or --stage-limit if
# lower), the whole run stopping at --budget seconds (default 480 on a GPU) so that
# one failure cannot eat the lease:
#   install      the carried wheels (.whl/, scripts/download_gpu_wheels.sh), then every stage import
#   env          GPU, driver, CUDA, NCCL, torch, Triton, megatron-core, Transformer Engine versions
#   gpu_tests    pytest -m gpu: the compiled Triton kernels vs the float64 reference, every mode,
#                V = 1271, 32000 and 128256, bf16 and fp32
#   bench_loss   benchmarks/bench_loss.py, N = 8192, V = 128256 and 151936, bf16: every mode vs
#                Megatron's fused and plain CE and the unfused KL (time, peak memory, bandwidth, floor)
#   bench_fused  benchmarks/bench_loss.py --fused-output, N = 8192, V = 128256, H = 4096, bf16: the
#                fused output-layer loss (--vopd-fused-output) vs the logits path, vopd/full_kl/vopd_topk
#   train        vopd-train on CUDA/NCCL: 0.46B student, 1.6B teacher, bf16, on-policy, a checkpoint
#                save then resume; tokens/s, step-time split, peak memory
#   tiles        benchmarks/tile_sweep.py: the kernels' launch shapes, the winner printed
#   teacher_fp8  benchmarks/bench_teacher.py bf16 vs FP8 when Transformer Engine imports, else skipped
# --cpu-smoke: the same stages at tiny sizes on CPU/gloo, Triton in its interpreter.
#
# Output in --out (default $OUT, else runs/gpu_acceptance), at most 8 files (the device
# tool brings back no more): summary.md, summary.csv, env.txt, bench_loss.csv,
# bench_loss.md (bench_fused's table appended), train.csv, tiles.csv, logs.tar.gz (every
# stage's full log, bench_fused.csv). They are
# rewritten after each stage, so a run cut short still leaves what it measured.
# Exit status 0 when every selected stage passed or was skipped.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ALL_STAGES=(install env gpu_tests bench_loss bench_fused train tiles teacher_fp8)
declare -A CAP_GPU=([install]=60 [env]=30 [gpu_tests]=150 [bench_loss]=150 [bench_fused]=120 [train]=200 [tiles]=100
                    [teacher_fp8]=90)
declare -A CAP_SMOKE=([install]=180 [env]=90 [gpu_tests]=300 [bench_loss]=400 [bench_fused]=200 [train]=400 [tiles]=200
                      [teacher_fp8]=200)

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
mode=gpu out=${OUT:-} stages=all budget="" work="" stage_limit=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--stages|--budget|--stage-limit|--work)
      [ $# -ge 2 ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --cpu-smoke) mode=smoke ;;
    --out) out=$2; shift ;;
    --stages) stages=$2; shift ;;
    --budget) budget=$2; shift ;;
    --stage-limit) stage_limit=$2; shift ;;
    --work) work=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$stages" = all ] && stages=$(IFS=,; echo "${ALL_STAGES[*]}")
for s in ${stages//,/ }; do
  [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "error: --stages: unknown stage '$s' (${ALL_STAGES[*]})" >&2; exit 2; }
done
for v in "$budget" "$stage_limit"; do
  [[ -z "$v" || "$v" =~ ^[0-9]+$ ]] || { echo "error: --budget / --stage-limit: '$v' is not a number of seconds" >&2; exit 2; }
done
budget=${budget:-$([ "$mode" = gpu ] && echo 480 || echo 1500)}
out=${out:-runs/gpu_acceptance}
work=${work:-$(mktemp -d /tmp/gpu_acceptance.XXXXXX)}
mkdir -p "$out" "$work/logs" "$work/notes" "$work/md"
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd)
rm -f "$work/stages.tsv"

export ACC_MODE=$mode ACC_ROOT=$root ACC_WORK=$work ACC_OUT=$out ACC_SITE=$work/site
export PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo "$root/.venv/bin/python" || echo python3)}
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
if [ "$mode" = gpu ]; then
  # The repository first (its vopd_megatron), then the carried wheels (megatron-core).
  export PYTHONPATH="$root:$ACC_SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=1
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git)")
cat > "$work/header.md" <<EOF
# GPU acceptance run ($([ "$mode" = gpu ] && echo GPU || echo "CPU rehearsal, --cpu-smoke: figures mean nothing"))

- started $(date -u +%FT%TZ) on $(uname -n), commit $commit
- command: \`bash scripts/gpu_acceptance.sh $([ "$mode" = smoke ] && echo "--cpu-smoke ")--stages $stages --budget $budget\`
- full logs: logs.tar.gz beside this file
EOF

pack() {  # the summary and logs, after every stage: a run cut short keeps what it measured
  "$PYTHON" scripts/acceptance/report.py summary "$work" "$out" "$@"
  tar -czf "$out/logs.tar.gz" -C "$work" --exclude=site --exclude=ckpt --exclude=whl --exclude=wheel_src . \
    2>/dev/null || true
}

t_start=$SECONDS
failed=0
for s in ${stages//,/ }; do
  if [ "$mode" = gpu ]; then cap=${CAP_GPU[$s]}; else cap=${CAP_SMOKE[$s]}; fi
  cap=${stage_limit:-$cap}
  left=$((budget - (SECONDS - t_start) - 10))  # 10 s kept for the summary
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    echo "not run: the ${budget}-second budget is spent" > "$work/notes/$s.txt"
    printf '%s\tnot_run\t0\t%s\n' "$s" "$cap" >> "$work/stages.tsv"
    failed=1
    pack
    continue
  fi
  echo "=== [$s] up to ${limit}s, $(date -u +%T)"
  t0=$SECONDS
  timeout -k 10 "$limit" bash scripts/acceptance/stage.sh "$s" > "$work/logs/$s.log" 2>&1
  rc=$?
  took=$((SECONDS - t0))
  case $rc in
    0) status=pass ;;
    3) status=skipped ;;
    124|137) status=timeout; echo "timed out after ${limit}s" >> "$work/notes/$s.txt" ;;
    *) status=fail ;;
  esac
  if [ "$status" = fail ] || [ "$status" = timeout ]; then
    failed=1
    tail -n 15 "$work/logs/$s.log" | sed "s/^/  [$s] /"
    [ -s "$work/notes/$s.txt" ] || tail -n 1 "$work/logs/$s.log" > "$work/notes/$s.txt"
  fi
  echo "    $status in ${took}s: $(head -c 300 "$work/notes/$s.txt" 2>/dev/null)"
  printf '%s\t%s\t%s\t%s\n' "$s" "$status" "$took" "$limit" >> "$work/stages.tsv"
  pack
done
rm -rf "$work/ckpt" "$work/site"
echo
echo "GPU acceptance ($mode), $((SECONDS - t_start)) s; files in $out; work dir $work"
pack --print
exit $failed
