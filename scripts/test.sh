#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, lint, then run pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh "test,ray,hf,serve,docs"
.venv/bin/ruff check ctprune tests benchmarks
# two pytest-xdist workers, one CPU thread each (tests/conftest.py shares $CTPRUNE_THREADS out); a
# group of tests (a module, or an xdist_group mark) runs on one worker
.venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 "$@"
