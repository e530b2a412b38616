#!/usr/bin/env bash
# Set up ./.venv and run the whole study on the embedded demo model (SmolLM2-135M-Instruct):
# convert → PT → SFT → inspect → weighted merge + fuse → HF export → eval (QA, MCQ) → α sweep + search → runs/demo/report.md.
# Extra arguments go to `mlx-med pipeline` (e.g. -o runs/elsewhere, --restart, -q). Re-running skips
# finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mlx-med doctor
.venv/bin/mlx-med pipeline -c configs/demo.yaml "$@"
