#!/usr/bin/env bash
# The prepared check for one lent GPU (issue 12): the benchmark, then the world demo at GPU size.
#
#   bash scripts/gpu_checks.sh wheels         # here (needs PyPI): the data stack's wheels for the
#                                             # GPU image's Python 3.12 -> .gpu_wheels/ (~11 MB)
#   bash scripts/gpu_checks.sh [all|bench|world]   # there, from the repository root (default all)
#
# A device call carries the wheels and runs everything in one command of at most 10 minutes:
#   run(command="bash scripts/gpu_checks.sh all", carry=[".gpu_wheels"], timeout_s=600)
# `all` keeps to TOTAL_SECONDS (default 570): BENCH_SECONDS (default 230) for
# scripts/benchmark_gpu.py, the rest for the world demo, whose training gets what is left after
# planning, start-up and evaluation are set aside, at most WORLD_TRAIN_SECONDS (default 300): in
# one 10-minute call that is about 3 minutes. `bench` and `world` run one half each (two calls:
# the full 5 minutes of world training, but more device time than a 15-minute lease).
#
# Results go to $OUT (runs/gpu_checks/ when OUT is unset): benchmark.json, world_plan.json,
# world_metrics.json (the evaluator's metrics.json), world_train.jsonl (the logged training
# windows) and gpu_checks.log (everything printed).
# The GPU image has jax, flax, optax and orbax but not gin, tfds, grain or array_record:
# benchmark_gpu.py needs none of them; the world demo needs the wheels (installed into
# /tmp/pixelllm_site, put on PYTHONPATH; it stops with a clear message without them).
# PYTHON (default python3) is the interpreter; WORLD_DIR (default /tmp/pixelllm_world) holds the
# generated world, prepared in the background while the benchmark runs (CPU only).
# WORLD_GIN_EXTRA: extra NAME=VALUE bindings (space-separated) for the world run (plan, train
# and evaluation alike; a CPU dry run shrinks the model with them).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
START=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_checks}
TOTAL_SECONDS=${TOTAL_SECONDS:-570}
BENCH_SECONDS=${BENCH_SECONDS:-230}
WORLD_TRAIN_SECONDS=${WORLD_TRAIN_SECONDS:-300}
WORLD_DIR=${WORLD_DIR:-/tmp/pixelllm_world}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
SITE=/tmp/pixelllm_site
# Set aside from the world's share: planning (compiles + measuring), the training command's
# start-up (data, state, compiles), evaluation (compiles, decoding 300 scenes, metrics).
PLAN_SECONDS=${PLAN_SECONDS:-75}
TRAIN_STARTUP_SECONDS=${TRAIN_STARTUP_SECONDS:-60}
EVAL_SECONDS=${EVAL_SECONDS:-90}
# The data stack's distributions (versions from requirements/constraints.txt); protobuf only
# where the image's is older than grain needs.
DATA_STACK="gin-config tensorflow-datasets tensorflow-metadata googleapis-common-protos grain
  array_record dm-tree immutabledict promise simple-parsing docstring_parser termcolor toml
  portpicker pycocotools pycocoevalcap tensorboardX protobuf"

left() { echo $(( TOTAL_SECONDS - ($(date +%s) - START) )); }
say() { echo "[gpu_checks +$(( $(date +%s) - START ))s] $*"; }

download_wheels() {
  # cp312 manylinux wheels for the GPU image; pycocoevalcap without its Java jars and METEOR
  # data (100 MB; the world evaluation runs with PIXELLLM_CAPTION_METRICS=offline).
  local pip="${PIP:-.venv/bin/python -m pip}" platforms="" n
  for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=" --platform manylinux_${n}_x86_64"; done
  rm -rf "$WHEELS" && mkdir -p "$WHEELS/tmp"
  local binary="" name
  for name in $DATA_STACK; do
    case $name in promise|pycocoevalcap) ;; *) binary+=" $name" ;; esac
  done
  $pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp \
    $platforms --platform manylinux2014_x86_64 -c requirements/constraints.txt -d "$WHEELS" \
    $binary || return 1
  $pip wheel -q --no-deps -c requirements/constraints.txt -w "$WHEELS" promise || return 1
  $pip download -q --no-deps -c requirements/constraints.txt -d "$WHEELS/tmp" pycocoevalcap \
    || return 1
  .venv/bin/python - "$WHEELS" <<'EOF' || return 1
import glob, os, sys, zipfile
src = glob.glob(os.path.join(sys.argv[1], "tmp", "pycocoevalcap-*.whl"))[0]
dst = os.path.join(sys.argv[1], os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
  for item in zin.infolist():
    if not item.filename.endswith((".jar", ".gz")) and "/spice/lib/" not in item.filename:
      zout.writestr(item, zin.read(item.filename))
EOF
  rm -rf "$WHEELS/tmp"
  ls "$WHEELS" && du -sh "$WHEELS"
}

data_stack_ok() {
  $PY -c "import gin, tensorflow_datasets, grain, array_record, pycocoevalcap, tensorboardX" \
    >/dev/null 2>&1
}

setup() {
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pixelllm_jax_cache}
  if [ -d "$SITE" ] && ! data_stack_ok; then  # installed by an earlier stage on this machine
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#$PWD}"
  fi
  if ! data_stack_ok && compgen -G "$WHEELS/*.whl" >/dev/null; then
    local wheels=("$WHEELS"/*.whl)
    if $PY -c "import sys, google.protobuf as p
sys.exit(tuple(map(int, p.__version__.split('.')[:3])) < (5, 28, 3))" 2>/dev/null; then
      wheels=($(ls "$WHEELS"/*.whl | grep -v '/protobuf-'))  # the image's protobuf will do
    fi
    say "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" || say "wheel install failed"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#$PWD}"
  fi
  if data_stack_ok; then DATA_STACK_OK=1; else DATA_STACK_OK=0; fi
  say "device: $($PY -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)' 2>&1 | tail -1)"
  say "data stack (gin, tfds, grain, array_record, pycocoevalcap, tensorboardX) importable: $DATA_STACK_OK"
}

prepare_world() {  # generation + tfds preparation, CPU only; leaves WORLD_DIR/.ready or .failed
  [ -f "$WORLD_DIR/.ready" ] && return 0
  rm -f "$WORLD_DIR/.failed"
  (
    export JAX_PLATFORMS=cpu
    if [ ! -f "$WORLD_DIR/spiece.model" ]; then
      $PY -m pixelllm_jax.data.world.generate --out_dir="$WORLD_DIR" --num_train=3000 \
        --num_val=200 --num_test=300 --image_size=64 --seed=0 || exit 1
    fi
    $PY - "$WORLD_DIR" <<'EOF' || exit 1
import sys
from pixelllm_jax.data.builders import common
from pixelllm_jax.data.sources import WORLD_BUILDER_CONFIGS
for builder, config in WORLD_BUILDER_CONFIGS:
  common.prepare(builder, config, sys.argv[1], sys.argv[1] + "/tfds")
EOF
  ) > "$OUT/world_prepare.log" 2>&1 && touch "$WORLD_DIR/.ready" || touch "$WORLD_DIR/.failed"
}

bench() {
  local budget=$BENCH_SECONDS
  [ "$STAGE" = all ] || budget=$(( TOTAL_SECONDS - 10 ))
  say "benchmark (at most ${budget}s)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92} \
    timeout -k 10 "$budget" $PY scripts/benchmark_gpu.py --out="$OUT/benchmark.json" \
    --budget_seconds=$(( budget - 25 ))
  local rc=$?
  [ $rc -eq 124 ] && say "benchmark stopped at its time limit (parts done so far are in benchmark.json)"
  return $rc
}

world() {
  if [ "$DATA_STACK_OK" != 1 ]; then
    say "world demo SKIPPED: gin / tfds / grain / array_record / pycocoevalcap are not importable" \
        "and no wheels were carried (bash scripts/gpu_checks.sh wheels here, then carry .gpu_wheels)"
    return 2
  fi
  while [ ! -f "$WORLD_DIR/.ready" ] && [ ! -f "$WORLD_DIR/.failed" ]; do
    [ "$(left)" -lt $(( PLAN_SECONDS + TRAIN_STARTUP_SECONDS + EVAL_SECONDS + 30 )) ] && break
    sleep 2
  done
  if [ ! -f "$WORLD_DIR/.ready" ]; then
    say "world data not ready (see world_prepare.log)"; cat "$OUT/world_prepare.log"; return 1
  fi
  local flags extra=() plan_extra=() b
  mapfile -t flags < <($PY scripts/world_gpu.py flags)
  for b in ${WORLD_GIN_EXTRA:-}; do extra+=("--gin.$b"); plan_extra+=("--gin=$b"); done
  say "planning the world run"
  rm -f "$OUT/world_plan.json"
  timeout -k 10 $(( PLAN_SECONDS + 60 )) $PY scripts/world_gpu.py plan --world_dir="$WORLD_DIR" \
    --seconds="$WORLD_TRAIN_SECONDS" --measure_seconds=10 --max_warmup_seconds="$PLAN_SECONDS" \
    --out="$OUT/world_plan.json" "${plan_extra[@]}"
  local rate
  rate=$($PY -c "import json; print(json.load(open('$OUT/world_plan.json'))['steps_per_second'])") \
    || { say "world plan failed (no world_plan.json)"; return 1; }
  local seconds=$(( $(left) - TRAIN_STARTUP_SECONDS - EVAL_SECONDS ))
  [ "$seconds" -gt "$WORLD_TRAIN_SECONDS" ] && seconds=$WORLD_TRAIN_SECONDS
  if [ "$seconds" -lt 30 ]; then say "too little time left for the world run"; return 1; fi
  local steps warmup
  read -r steps warmup < <($PY scripts/world_gpu.py schedule --seconds="$seconds" \
    --steps_per_second="$rate")
  say "world: $rate steps/s measured -> TRAIN_STEPS=$steps (warm-up $warmup) for ${seconds}s"
  extra+=("--gin.make_optimizer.warmup_steps=$warmup")
  local model_dir=/tmp/pixelllm_world_run
  rm -rf "$model_dir"
  # SIGTERM past the plan's time: the trainer saves a checkpoint and exits, and that is evaluated.
  timeout -s TERM -k 30 $(( seconds * 12 / 10 + TRAIN_STARTUP_SECONDS )) \
    $PY -m pixelllm_jax.train --gin_file=runs/demo.gin "${flags[@]}" "${extra[@]}" \
    --gin.MODEL_DIR="'$model_dir'" --gin.WORLD_DIR="'$WORLD_DIR'" --gin.TRAIN_STEPS="$steps"
  local rc=$?
  cp "$model_dir/train/metrics.jsonl" "$OUT/world_train.jsonl" 2>/dev/null
  if [ $rc -eq 124 ]; then
    say "training stopped by its time limit (SIGTERM: its last checkpoint is evaluated)"
  elif [ $rc -ne 0 ]; then
    say "world training failed (exit $rc)"; return 1
  fi
  # Caption metrics with the offline tokenization and no METEOR: the toolkit's PTB tokenizer and
  # METEOR run jars that the carried pycocoevalcap leaves out (and need Java). The targets'
  # metrics (refer P@0.5, pointing, region-phrase exact match on the world's plain lower-case
  # words) come out the same either way; CIDEr is not the toolkit's number.
  export PIXELLLM_CAPTION_METRICS=${PIXELLLM_CAPTION_METRICS:-offline}
  say "world evaluation (caption metrics: $PIXELLLM_CAPTION_METRICS)"
  timeout -k 10 $(( $(left) > 30 ? $(left) : 30 )) \
    $PY -m pixelllm_jax.eval --gin_file=runs/demo.gin "${flags[@]}" "${extra[@]}" \
    --gin.MODEL_DIR="'$model_dir'" --gin.WORLD_DIR="'$WORLD_DIR'" --gin.TRAIN_STEPS="$steps" \
    || { say "world evaluation failed"; return 1; }
  cp "$model_dir/metrics.json" "$OUT/world_metrics.json"
  $PY - "$OUT/world_metrics.json" "$model_dir/train_summary.json" <<'EOF'
import json, sys
metrics = json.load(open(sys.argv[1]))
try:
  summary = json.load(open(sys.argv[2]))
except OSError:
  summary = {}
print("world demo (GPU config):", {k: metrics.get(k) for k in (
    "refer_p@0.5", "refer_mean_iou", "trace_pointing_acc", "loca_exact_match", "caption_cider",
    "train_seconds")}, "finished:", summary.get("finished"))
for name, target in (("refer_p@0.5", 0.85), ("trace_pointing_acc", 0.90),
                     ("loca_exact_match", 0.90)):
  value = metrics.get(name)
  print(f"  {name} {value} (target >= {target}): "
        + ("n/a" if value is None else "met" if value >= target else "NOT met"))
EOF
}

case $STAGE in
  wheels) download_wheels; exit $? ;;
  all|bench|world) ;;
  *) echo "usage: bash scripts/gpu_checks.sh [wheels|all|bench|world]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1
setup
status=0
prepare_pid=
if [ "$STAGE" != bench ] && [ "$DATA_STACK_OK" = 1 ]; then
  prepare_world &  # CPU work, overlapping the benchmark
  prepare_pid=$!
fi
if [ "$STAGE" != world ]; then bench || status=1; fi
if [ "$STAGE" != bench ]; then world || status=1; fi
# No `wait`: it would also wait for the log's tee, which never ends. The world stage has waited
# for the preparation already, or given up on it.
if [ -n "$prepare_pid" ] && kill -0 "$prepare_pid" 2>/dev/null; then
  say "world preparation still running; left behind"
fi
say "done (exit $status)"
exit $status
