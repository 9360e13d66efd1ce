#!/usr/bin/env bash
# The main job: set up .venv, then the whole path in one command (recipes/quickstart.yaml), offline, in two tracks:
# from scratch (curate -> tokenizer -> shards -> pretrain a 7M decoder -> held-out bits per byte against xz) and
# adapting a real model (SmolLM2-135M-Instruct -> LoRA SFT -> DPO -> int8 -> served, three questions asked through
# the OpenAI client). Ends with the table of what each stage achieved on held-out data, the HTML report's path and
# the command to chat with the final model. A re-run skips the stages that finished. Extra arguments go to
# `lmforge pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,humaneval,report,gguf,curate
. .venv/bin/activate
lmforge pipeline --config recipes/quickstart.yaml "$@"
