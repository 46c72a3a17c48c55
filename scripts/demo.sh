#!/usr/bin/env bash
# The main job on the built-in synthetic corpus: train a tiny origin model, then evaluate it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
out=${1:-runs/demo}
if [ -f "$out/origin/last/trainer_state.pt" ]; then resume=--resume; else resume=; fi
.venv/bin/ctprune train --preset tiny --corpus synthetic --epochs 8 -o "$out/origin" $resume
.venv/bin/ctprune evaluate "$out/origin" --corpus synthetic --split test
.venv/bin/ctprune evaluate "$out/origin" --corpus synthetic --split test --beam 4
echo "demo done: model in $out/origin, hypotheses and scores in $out/origin/eval/"
