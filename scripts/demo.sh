#!/usr/bin/env bash
# Install mlx-med into ./.venv and run the main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mlx-med doctor
