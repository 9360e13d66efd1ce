#!/usr/bin/env bash
# Set up and run the default test suite (not slow/bench/gpu). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,gguf
. .venv/bin/activate
python -m pytest -q "$@"
