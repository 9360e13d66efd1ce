#!/usr/bin/env bash
# The main job: set up .venv, then the whole path on the Python standard library's source in one command
# (recipes/quickstart.yaml: curate -> tokenizer -> pretrain -> SFT -> DPO -> evaluate -> serve one chat request),
# then the HTML report. A re-run skips the stages that finished. Extra arguments go to `lmforge pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,humaneval,report,gguf,curate
. .venv/bin/activate
lmforge pipeline --config recipes/quickstart.yaml "$@"
lmforge report runs/quickstart
