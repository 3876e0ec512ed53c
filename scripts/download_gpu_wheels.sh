#!/usr/bin/env bash
# Download the wheels the GPU acceptance run carries to the device machine
# (scripts/acceptance/wheels.txt: what the device image lacks) into .whl/
# (git-ignored), for CPython 3.12 on x86_64, without dependencies, and check
# that they and the repository fit the device tool's 64 MiB limit per call.
#   bash scripts/download_gpu_wheels.sh            # needs PyPI (run it here, not on the device)
#   bash scripts/download_gpu_wheels.sh --dry-run  # print what it would do
# Then, on the device: scripts/gpu_acceptance.sh installs .whl/*.whl with
# `pip install --no-index --no-deps --target` (docs/performance.md, "GPU acceptance").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
limit_mib=64
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mapfile -t wheels < <(grep -v '^\s*#' scripts/acceptance/wheels.txt | sed 's/\s//g' | grep -v '^$')
for w in "${wheels[@]}"; do
  [[ "$w" == *==* ]] || { echo "error: scripts/acceptance/wheels.txt: '$w' is not NAME==VERSION" >&2; exit 2; }
done
# The platforms the device README names, plus manylinux_2_24 (megatron-core's tag): pip
# matches each manylinux_2_N exactly.
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
cmd=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     "${platforms[@]}" -d "$tmp" "${wheels[@]}")
echo "[wheels] ${wheels[*]} -> .whl/"
if [ "$dry" = 1 ]; then
  echo "[wheels] would run: ${cmd[*]}"
  exit 0
fi
"${cmd[@]}"
# One version of each: a stale second wheel would stop the whole install there.
rm -rf .whl && mkdir .whl && mv "$tmp"/*.whl .whl/
ls -l .whl
wheel_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
# What travels: tracked files and untracked files git does not ignore, plus the carried .whl.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheel_bytes + tree_bytes))
echo "[wheels] .whl ${wheel_bytes} bytes + working tree ${tree_bytes} bytes = $((total / 1048576)) MiB of ${limit_mib} MiB"
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
  echo "error: the wheels and the working tree exceed the device tool's ${limit_mib} MiB per call" >&2
  exit 1
fi
