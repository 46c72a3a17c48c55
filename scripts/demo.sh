#!/usr/bin/env bash
# The main job: the demo composability experiment (examples/demo.toml) on the built-in synthetic
# corpus. Re-running it resumes; the report is written to runs/demo/report.md and report.html.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh ""  # ctprune alone: the demo needs no extra
out=${1:-runs/demo}
.venv/bin/ctprune run examples/demo.toml -o "$out"
echo "demo done: open $out/report.html (or read $out/report.md)"
