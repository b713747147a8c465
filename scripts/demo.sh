#!/usr/bin/env bash
# The embedded demo (the README's main command): set up .venv, generate the grounded
# world, train the tiny PixelLLM on it and evaluate on held-out scenes.
# Writes data/world/ and runs/demo/ (metrics.json, eval/*.png, checkpoints, events).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
if [ ! -f data/world/spiece.model ]; then
  $PY -m pixelllm_jax.data.world.generate --out_dir=data/world \
    --num_train=3000 --num_val=200 --num_test=300 --image_size=64 --seed=0
fi
$PY -m pixelllm_jax.train --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'" \
  --gin.WORLD_DIR="'data/world'" "$@"
$PY -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'" \
  --gin.WORLD_DIR="'data/world'" "$@"
