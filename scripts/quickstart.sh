#!/usr/bin/env bash
# The main job: set up, bring the real SmolLM2-135M-Instruct (GGUF) into a Hugging Face folder, chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gguf
. .venv/bin/activate
lmforge convert smollm2-135m-instruct runs/quickstart/smollm2-135m-instruct
lmforge generate --model runs/quickstart/smollm2-135m-instruct --chat \
  --prompt "${1:-In two sentences, what is a language model?}" --max-new-tokens 80
echo "Chat again with: .venv/bin/lmforge generate --model runs/quickstart/smollm2-135m-instruct --chat --prompt 'Hi!'"
