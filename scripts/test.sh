#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, lint, then run pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh "test,ray,hf,serve,docs"
.venv/bin/ruff check ctprune tests benchmarks
.venv/bin/python -m pytest -q --durations=15 "$@"
