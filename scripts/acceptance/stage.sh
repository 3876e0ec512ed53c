#!/usr/bin/env bash
# One stage of scripts/gpu_acceptance.sh, which runs it under `timeout` with
# ACC_MODE (gpu | smoke), ACC_ROOT, ACC_WORK, ACC_OUT, ACC_SITE and PYTHON set.
#   bash scripts/acceptance/stage.sh NAME
# Exit 0: passed; 3: skipped (the reason is in the stage's note); else failed.
# Each stage writes its one-line result to $ACC_WORK/notes/NAME.txt, a Markdown
# section to $ACC_WORK/md/NAME.md, and its figures to $ACC_OUT.
set -euo pipefail
cd "$ACC_ROOT"
py=$PYTHON
W=$ACC_WORK
O=$ACC_OUT
name=$1
note=$W/notes/$name.txt
md=$W/md/$name.md
smoke=0
[ "$ACC_MODE" = smoke ] && smoke=1
report() { "$py" scripts/acceptance/report.py "$@"; }

install_wheels() {  # DIR: the device tool's install command (no index, no dependencies)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$ACC_SITE" "$1"/*.whl
}

stage_install() {
  if [ "$smoke" = 1 ]; then
    # Nothing to carry on CPU. Build this repository's wheel offline and install it
    # with the device's command into a throwaway target, import it from there;
    # check the download helper's plan and that every distribution the stages
    # import is on the device image or in scripts/acceptance/wheels.txt.
    rm -rf "$W/wheel_src" "$W/whl"
    mkdir -p "$W/wheel_src"
    cp -r pyproject.toml setup.py README.md vopd_megatron "$W/wheel_src/"
    "$py" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$W/whl" "$W/wheel_src"
    install_wheels "$W/whl"
    (cd "$W" && PYTHONPATH="$ACC_SITE" "$py" -c "import sys, vopd_megatron as v; f = v.__file__; \
print('imported from', f); sys.exit(0 if f.startswith('$ACC_SITE/') else 1)")
    bash scripts/download_gpu_wheels.sh --dry-run
    "$py" scripts/acceptance/env_report.py deps --closure --note "$note"
  else
    if compgen -G ".whl/*.whl" >/dev/null; then
      ls -l .whl
      install_wheels .whl
    else
      echo "no .whl/ here (bash scripts/download_gpu_wheels.sh, then carry .whl): using what is installed"
    fi
    "$py" scripts/acceptance/env_report.py deps --note "$note"
  fi
}

stage_env() {
  "$py" scripts/acceptance/env_report.py env --note "$note" | tee "$O/env.txt"
  { echo '```'; cat "$O/env.txt"; echo '```'; } > "$md"
  if [ "$smoke" = 0 ]; then
    nvidia-smi || true
  fi
}

stage_gpu_tests() {
  # Every test marked gpu: the compiled Triton kernels against the float64
  # reference (every mode, V = 1271, 32000, 128256, bf16 and fp32), the step
  # timer on CUDA, cpu_compat off on a GPU, the FP8 runtime check. Rehearsal: the
  # kernel cases at V = 1271 on CPU tensors in the interpreter.
  local args=(-m gpu -q -rfEs -p no:cacheprovider --junitxml "$W/logs/gpu_tests.xml") min=39
  if [ "$smoke" = 1 ]; then
    args+=(--gpu-on-cpu -k "not V32000 and not V128256")
    min=13
  fi
  "$py" -m pytest "${args[@]}" tests || true  # the report decides, from the JUnit file
  report pytest "$W/logs/gpu_tests.xml" --min-passed "$min" --note "$note" --md "$md"
}

stage_bench_loss() {
  local vocabs=(128256 151936) args=(--tokens 8192 --backends auto,torch --repeats 30 --warmup 5)
  if [ "$smoke" = 1 ]; then
    vocabs=(1271 1519)
    args=(--tokens 64 --backends triton --repeats 1 --warmup 1 --peak-gbs 50)
  fi
  : > "$O/bench_loss.md"
  local csvs=()
  for v in "${vocabs[@]}"; do  # one vocabulary failing does not stop the other
    "$py" benchmarks/bench_loss.py --vocab "$v" --dtype bf16 "${args[@]}" --csv "$W/bench_loss_$v.csv" \
      | tee -a "$O/bench_loss.md" || echo "bench_loss.py --vocab $v failed (log: bench_loss.log)" >> "$O/bench_loss.md"
    echo >> "$O/bench_loss.md"
    csvs+=("$W/bench_loss_$v.csv")
  done
  cp "$O/bench_loss.md" "$md"
  report bench "${csvs[@]}" --csv-out "$O/bench_loss.csv" --note "$note"
}

stage_bench_fused() {
  # The output layer + loss from hidden states (--vopd-fused-output) next to the
  # logits path, at an 8B-class shape. Its CSV travels in logs.tar.gz (8 files come
  # back at most); its table is appended to bench_loss.md.
  # --fused-gemm torch,triton: the default tile GEMMs (cuBLAS, Triton epilogues) and
  # the tl.dot kernels, side by side.
  local args=(--tokens 8192 --vocab 128256 --hidden 4096 --backends auto,torch --fused-gemm torch,triton
              --repeats 20 --warmup 3)
  if [ "$smoke" = 1 ]; then
    args=(--tokens 64 --vocab 1271 --hidden 64 --backends triton --fused-gemm torch,triton --repeats 1 --warmup 1)
  fi
  "$py" benchmarks/bench_loss.py --fused-output --dtype bf16 --modes vopd,full_kl,vopd_topk "${args[@]}" \
    --csv "$W/bench_fused.csv" | tee "$md"
  { echo; echo "### --fused-output"; echo; cat "$md"; } >> "$O/bench_loss.md"
  report fused "$W/bench_fused.csv" --note "$note"
}

stage_train() {
  # Two launches of vopd-train, one process each (NCCL on a GPU, gloo on CPU): the
  # first saves a checkpoint at its last iteration, the second resumes from it.
  # Plain python, not torchrun: torchrun starts its workers in a new session, out
  # of reach of the stage's `timeout`, and on the device such a process would run
  # on, holding the GPU, after the command returns.
  local cfg=scripts/acceptance/train_gpu.yaml first=3
  if [ "$smoke" = 1 ]; then
    cfg=scripts/acceptance/train_smoke.yaml
    first=2
  fi
  rm -rf "$W/ckpt" "$W/tb1" "$W/tb2"
  "$py" -m vopd_megatron.training.train --config "$cfg" --dry-run --gpu-memory-gb 141 > "$W/logs/train_plan.txt"
  cat "$W/logs/train_plan.txt"
  local launch=("$py" -m vopd_megatron.training.train --config "$cfg")
  "${launch[@]}" --train-iters "$first" --save "$W/ckpt" --save-interval "$first" --tensorboard-dir "$W/tb1"
  "${launch[@]}" --load "$W/ckpt" --tensorboard-dir "$W/tb2"
  report train "$W/tb1/metrics.jsonl" "$W/tb2/metrics.jsonl" --first-iters "$first" \
    --dry-run "$W/logs/train_plan.txt" --csv-out "$O/train.csv" --note "$note" --md "$md"
}

stage_teacher_fp8() {
  local reason
  reason=$("$py" -c "from vopd_megatron.model.fp8 import fp8_runtime_problems as p; print('; '.join(p()))")
  if [ -z "$reason" ]; then
    "$py" benchmarks/bench_teacher.py --variants bf16,fp8 --csv "$W/teacher.csv" | tee "$md"
    report teacher "$W/teacher.csv" --note "$note"
    return
  fi
  if [ "$smoke" = 1 ]; then  # keep the benchmark's path alive: tiny model, the FP8 row says why
    "$py" benchmarks/bench_teacher.py --variants bf16,fp8 --repeats 1 --csv "$W/teacher.csv" | tee "$md"
  fi
  echo "skipped: $reason" | tee "$note"
  exit 3
}

stage_tiles() {
  local args=()
  [ "$smoke" = 1 ] && args=(--repeats 1)
  "$py" benchmarks/tile_sweep.py --csv "$O/tiles.csv" "${args[@]}" | tee "$md"
  report tiles "$O/tiles.csv" --note "$note"
}

"stage_$name"
