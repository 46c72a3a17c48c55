#!/usr/bin/env bash
# Create (once) and update the local virtual environment .venv; sourced by demo.sh and test.sh
# with the extras they need ("" for the demo: ctprune alone; "test,ray,hf,serve,docs" for the tests).
# torch==2.13.0 is installed first so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=${1-test,ray,hf,serve,docs}
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ctprune-installed-${extras:-base}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
