#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 interpreter and install vopd_megatron with
# megatron-core 0.19.x and the test tools. Idempotent: a second run only
# re-installs the package itself.
#
# megatron-core >= 0.17 declares Requires-Python >= 3.12, so a 3.12 interpreter
# is required; it is looked for in $VOPD_PYTHON, on PATH, then under pyenv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VOPD_VENV:-$root/.venv}
torch_version=${VOPD_TORCH_VERSION:-2.13.0}

quiet_pip() {  # drop pip's notes about local index folders that do not exist here
  grep -v -e "^WARNING: Location 'file:" -e "BuildBackendWarning" || true
}

version_ok() {  # exit 0 when "$1" is a Python >= 3.12
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}

find_python() {
  local candidates=()
  [ -n "${VOPD_PYTHON:-}" ] && candidates+=("$VOPD_PYTHON")
  candidates+=(python3.13 python3.12 python3)
  if command -v pyenv >/dev/null 2>&1 || [ -d "${PYENV_ROOT:-$HOME/.pyenv}" ]; then
    local pyroot=${PYENV_ROOT:-$HOME/.pyenv}
    command -v pyenv >/dev/null 2>&1 && pyroot=$(pyenv root)
    for p in "$pyroot"/versions/3.12*/bin/python3.12 "$pyroot"/versions/3.13*/bin/python3.13; do
      [ -x "$p" ] && candidates+=("$p")
    done
  fi
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && version_ok "$c"; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

if [ -x "$venv/bin/python" ] && version_ok "$venv/bin/python"; then
  py="$venv/bin/python"
else
  if ! base=$(find_python); then
    cat >&2 <<MSG
error: no Python >= 3.12 interpreter found.
  megatron-core >= 0.17 (this project targets 0.19.x) requires Python >= 3.12.
  Looked in: \$VOPD_PYTHON, python3.13/python3.12/python3 on PATH, pyenv versions.
  Install one (e.g. 'pyenv install 3.12') or point VOPD_PYTHON at it, then re-run.
MSG
    exit 1
  fi
  echo "[setup] creating $venv with $base ($("$base" --version))"
  "$base" -m venv "$venv"
  py="$venv/bin/python"
  "$py" -m pip install -q --upgrade pip 2>&1 | quiet_pip
fi

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$torch_version (the PyPI build; it runs on CPU)"
  "$py" -m pip install -q "torch==$torch_version" 2>&1 | quiet_pip
fi
echo "[setup] installing vopd_megatron[test,demo] (editable) and megatron-core"
"$py" -m pip install -q -e "$root[test,demo]" 2>&1 | quiet_pip
"$py" - <<'PY'
import megatron.core, torch, vopd_megatron
print(f"[setup] ok: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {megatron.core.__version__}, cuda available: {torch.cuda.is_available()}")
PY
