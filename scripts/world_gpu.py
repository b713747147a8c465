"""The world demo at GPU size: its config (gin bindings over runs/demo.gin) and its step count.

  python scripts/world_gpu.py flags        # the --gin.NAME=VALUE flags of the config, one a line
  python scripts/world_gpu.py schedule --seconds=S --steps_per_second=R   # "TRAIN_STEPS WARMUP"
  python scripts/world_gpu.py plan --world_dir=DIR --seconds=300 [--measure_seconds=20] [--out=F]
      # -> one JSON line: end-to-end steps / s of this config here and the TRAIN_STEPS that fill
      #    `seconds` of training

scripts/gpu_checks.sh trains and evaluates with these flags (`python -m pixelllm_jax.train
--gin_file=runs/demo.gin <flags> --gin.TRAIN_STEPS=<plan>`). The step count is measured, not
guessed, because the cosine schedule must end at the last step: `plan` builds the run's own
model, data stream and training step from the same gin files and flags, compiles the step for
every task shape of the mixture, then times real steps on real batches (the data pipeline runs
in this thread as in the training loop, so whichever of device and pipeline is slower sets the
rate), and keeps 10% in hand for logging and the final checkpoint. It needs the data stack
(gin, tfds, grain): unlike scripts/benchmark_gpu.py it is not model-only.

The config (every tower of models/tiny.gin at GPU width; untested on a GPU so far):
- EVA02 patch 4 on the 64 px world (a 16 x 16 grid instead of 8 x 8: referring boxes need finer
  features), width 256, depth 6; SAM patch 8, width 128, depth 4; extractor width 256, depth 4,
  32 queries; T5 width 256, 4 + 4 layers; localization head 256 wide; SAM's width 256 shared
  by the prompt encoder and the mask head (SAM's decoder sizes, adapter MLP 1024); box decoder
  width 128, ROI FC 256, 64 proposals. About 31 M parameters (tiny.gin: 1.1 M).
- Batch 64 images (tiny: 16), 16 grain read threads (the GPU hosts have 16 cores), AdamW 5e-4
  with 500 warmup steps (demo: 1e-3, 300), the demo's losses (GIoU on boxes).
- float32 compute: the model is small, and bf16 would coarsen the point regression.
"""
import argparse
import json
import sys
import time

# (gin binding, value in gin syntax), applied after runs/demo.gin.
BINDINGS = (
    ("EVA02Config.patch_size", "4"),
    ("EVA02Config.width", "256"),
    ("EVA02Config.depth", "6"),
    ("EVA02Config.num_heads", "8"),
    ("EVA02Config.mlp_dim", "683"),
    ("EVA02Config.pretrain_grid", "16"),
    ("SamViTConfig.patch_size", "8"),
    ("SamViTConfig.width", "128"),
    ("SamViTConfig.depth", "4"),
    ("SamViTConfig.num_heads", "4"),
    ("SamViTConfig.mlp_dim", "512"),
    ("SamViTConfig.window_size", "4"),
    ("SamViTConfig.global_blocks", "(1, 3)"),
    ("SamViTConfig.out_channels", "256"),      # SAM's width = the prompt encoder's = the mask head's
    ("PromptEncoderConfig.embed_dim", "256"),  # = extractor width, as tiny.gin
    ("MaskDecoderConfig.transformer_dim", "256"),
    ("MaskDecoderConfig.transformer_num_heads", "8"),
    ("MaskDecoderConfig.transformer_mlp_dim", "1024"),
    ("MaskDecoderConfig.iou_head_hidden_dim", "256"),
    ("MaskHeadConfig.adapter_num_heads", "8"),
    ("MaskHeadConfig.adapter_mlp_dim", "1024"),
    ("BoxHeadConfig.width", "128"),
    ("BoxHeadConfig.num_proposals_train", "64"),
    ("BoxHeadConfig.num_proposals_test", "64"),
    ("BoxHeadConfig.roi_fc", "256"),
    ("BoxHeadConfig.roi_samples", "64"),
    ("PromptExtractorConfig.depth", "4"),
    ("PromptExtractorConfig.width", "256"),
    ("PromptExtractorConfig.num_heads", "8"),
    ("PromptExtractorConfig.mlp_dim", "1024"),
    ("PromptExtractorConfig.num_queries", "32"),
    ("PromptExtractorConfig.output_dim", "256"),
    ("T5Config.d_model", "256"),
    ("T5Config.num_heads", "8"),
    ("T5Config.d_kv", "32"),
    ("T5Config.d_ff", "1024"),
    ("T5Config.num_encoder_layers", "4"),
    ("T5Config.num_decoder_layers", "4"),
    ("LocHeadConfig.hidden_dim", "256"),
    ("BATCH_SIZE", "64"),
    ("train_data.num_threads", "16"),
    ("make_optimizer.learning_rate", "5e-4"),
    ("make_optimizer.warmup_steps", "500"),
    ("train.log_every", "250"),
    ("train.checkpoint_every", "1000000"),  # the run saves at its end (and on SIGTERM)
    ("evaluate.batch_size", "64"),
)
GIN_FILE = "runs/demo.gin"
SAFETY = 0.9  # of the measured rate: logging, the final checkpoint, a slower stretch


def gin_flags() -> list[str]:
  return [f"--gin.{name}={value}" for name, value in BINDINGS]


def steps_for(seconds: float, steps_per_second: float, safety: float = SAFETY) -> int:
  """Training steps that fit `seconds` at `steps_per_second`, keeping 1 - safety in hand."""
  if seconds <= 0 or steps_per_second <= 0:
    raise ValueError(f"need positive seconds and rate, got {seconds}, {steps_per_second}")
  return max(2, int(seconds * steps_per_second * safety))


def warmup_for(steps: int) -> int:
  """The config's warm-up, shortened to a tenth of a run too short for it (the schedule
  needs more steps than warm-up)."""
  configured = int(dict(BINDINGS)["make_optimizer.warmup_steps"])
  return min(configured, max(1, steps // 10))


def _distinct_shapes(mixture, task_shapes) -> set:
  """The batch shapes a homogeneous mixture yields: one per distinct task shape (tasks
  without their own share one)."""
  # pylint: disable-next=import-outside-toplevel
  from pixelllm_jax import tasks
  own = {task: tuple(shape) for task, *shape in task_shapes}
  # A mask or detection task's batches carry more fields: a program of their own.
  return {(own.get(task, "shared"), tasks.get(task).mask_loss, tasks.get(task).detection)
          for task, _ in mixture}


def measure(world_dir: str, measure_seconds: float, extra: list[str], max_warmup_seconds: float
            ) -> dict:
  """Steps / s of the configured training on this machine (module docstring)."""
  # pylint: disable=import-outside-toplevel  (the data stack only in this mode)
  import jax
  from absl import flags
  from pixelllm_jax import cli
  from pixelllm_jax.train import optim, trainer
  from pixelllm_jax.train import state as state_lib
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  bindings = [f"{n}={v}" for n, v in BINDINGS] + [
      f"WORLD_DIR='{world_dir}'", "MODEL_DIR='unused'", "TRAIN_STEPS=1000000"] + extra
  cli.parse_gin([GIN_FILE], bindings)
  model, partitioner = cli.build("train.model"), cli.build("train.partitioner")
  optimizer = optim.with_frozen(cli.build("train.optimizer"), model.trainable)
  data = cli.build("train.train_data")
  start = time.perf_counter()
  first = trainer.as_batch(next(data))
  spec = state_lib.state_spec(model, first, optimizer, partitioner)
  state = spec.init(partitioner.replicate(jax.random.key(0)))
  step = trainer.make_train_step(model, optimizer, partitioner=partitioner,
                                 state_shardings=spec.shardings)
  rng = partitioner.replicate(jax.random.key(1))
  want = len(_distinct_shapes(cli.build("train_data.mixture"),
                               cli.build("train_data.task_shapes") or ()))
  seen = set()

  def shape_of(b):
    return (b.prompt_boxes.shape[1], *b.decoder_target_tokens.shape[1:], b.context_tokens.shape[-1],
            b.mask_targets is not None, b.det_boxes is not None)

  def compile_step(state, b):
    """One step of a shape not seen yet, waited for: its compile stays out of the timing."""
    state, metrics = step(state, partitioner.shard_batch(b), rng)
    seen.add(shape_of(b))
    return jax.block_until_ready(state), metrics

  batch = first
  while len(seen) < want and time.perf_counter() - start < max_warmup_seconds:
    if shape_of(batch) in seen:
      state, metrics = step(state, partitioner.shard_batch(batch), rng)
    else:
      state, metrics = compile_step(state, batch)
    batch = trainer.as_batch(next(data))
  warmup_s = time.perf_counter() - start
  timed, steps, clock = 0.0, 0, time.perf_counter()
  while timed + time.perf_counter() - clock < measure_seconds:
    if shape_of(batch) in seen:
      state, metrics = step(state, partitioner.shard_batch(batch), rng)
      steps += 1
    else:  # a shape the warm-up missed: stop the clock around its compile
      jax.block_until_ready(state)
      timed += time.perf_counter() - clock
      state, metrics = compile_step(state, batch)
      clock = time.perf_counter()
    batch = trainer.as_batch(next(data))
  jax.block_until_ready(metrics)
  rate = steps / (timed + time.perf_counter() - clock)
  return {"steps_per_second": rate, "measured_steps": steps, "shapes_compiled": len(seen),
          "warmup_seconds": warmup_s, "device": str(jax.devices()[0].device_kind),
          "loss": float(metrics["loss"])}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("flags", "plan", "schedule"))
  parser.add_argument("--world_dir", default="data/world")
  parser.add_argument("--seconds", type=float, default=300.0, help="training time to fill")
  parser.add_argument("--measure_seconds", type=float, default=20.0)
  parser.add_argument("--max_warmup_seconds", type=float, default=180.0)
  parser.add_argument("--steps_per_second", type=float, default=None, help="for `schedule`")
  parser.add_argument("--out", default=None, help="also write the plan's JSON here")
  parser.add_argument("--gin", action="append", default=[],
                      help="extra NAME=VALUE bindings after the config's (repeatable)")
  args = parser.parse_args(argv)
  if args.command == "flags":
    print("\n".join(gin_flags()))
    return 0
  if args.command == "schedule":  # "TRAIN_STEPS WARMUP_STEPS" for `seconds` at the given rate
    steps = steps_for(args.seconds, args.steps_per_second)
    print(steps, warmup_for(steps))
    return 0
  result = measure(args.world_dir, args.measure_seconds, args.gin, args.max_warmup_seconds)
  result["seconds"] = args.seconds
  result["train_steps"] = steps_for(args.seconds, result["steps_per_second"])
  result["warmup_steps"] = warmup_for(result["train_steps"])
  print(json.dumps(result), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
