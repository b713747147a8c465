"""One-accelerator benchmark of the paper-scale PixelLLM (random weights), or its CPU smoke run.

  python scripts/benchmark_gpu.py [--mode=gpu|cpu_smoke] [--out=FILE] [--parts=matmul,train,decode]
      [--train_batch=16] [--budget_seconds=300]

Parts (each prints one JSON line when done; the whole report goes to --out, default
$OUT/benchmark.json when OUT is set, rewritten after every part so a killed run keeps the rest):
1. matmul: the bf16 matmul peak of this device, measured in this run (n x n x n products,
   timed after a warm-up, best of several trials), the denominator of every utilization below.
2. train: one training step of the paper config (`paper_config`: EVA02-L + SAM-H + Flan-T5-XL with
   LoRA, 384 px, SAM / prompt encoder / T5 base frozen) on random weights and a random RefCOCO-
   shaped batch (16 slots of 40 tokens per image, 40 context tokens), bf16 compute with float32
   master weights (partitioning.DtypePolicy), remat per block (RematPolicy), `scan` on every tower
   config that has the field, AdamW as runs/refcoco_t5_xl.gin. The step is the training loop's own
   (`trainer.make_train_step`), compiled ahead of time. Reports examples (images) / s, model
   FLOPs per step (analytic, scripts/model_flops.py: no remat recomputation) and XLA's count of
   the compiled step (`cost_analysis`: with the recomputation; a scanned loop body counted once),
   MFU = analytic FLOPs / step time / measured peak, and peak device memory.
3. decode: greedy decoding of 64 sequences with the Flan-T5-XL decoder (LoRA on, bf16 weights and
   compute, as for inference) through `decoding.greedy_decode`: with the KV cache (one token per
   step) vs re-running the decoder over the whole (fixed-length) prefix at every step, as the
   official code did. ms per generated token of each (the cached one includes creating the
   cache, where the cross-attention keys and values are projected once per sequence), the
   speedup, and whether both emit the same tokens.
`--mode=cpu_smoke` runs the same code on toy sizes (a few steps, no timing asserted); tests/
test_benchmark_gpu.py runs it. `--budget_seconds`: a part that would start with less time left
than it needs is skipped (reported so); scripts/gpu_checks.sh sizes it to the device's budget.

Imports: only the model side of the project (models, model.py, partitioning, losses, decoding,
train/{state, optim, trainer}); never gin, tfds or grain, which a GPU image may lack. model.py
reaches the caption scorer (pycocoevalcap) through losses -> tasks -> metrics; when that package
is missing, it is replaced by a placeholder that raises if called (the benchmark scores no
captions), and the report lists it under `placeholder_imports`.
"""
import argparse
import dataclasses
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

# Packages the model path imports but the benchmark never calls (module docstring).
_NOT_CALLED = ("pycocoevalcap",)


class _Placeholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `root` and its submodules as empty modules whose attributes are classes that
  raise when instantiated (classes, so annotations such as `Meteor | None` still work)."""

  def __init__(self, root: str):
    self.root = root

  def find_spec(self, name, path, target=None):
    if name == self.root or name.startswith(self.root + "."):
      return importlib.util.spec_from_loader(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    root = self.root

    def attribute(name):
      if name.startswith("__"):
        raise AttributeError(name)

      def unavailable(self, *args, **kwargs):
        raise ImportError(f"{module.__name__}.{name}: {root} is not installed here")
      return type(name, (), {"__init__": unavailable})
    module.__getattr__ = attribute


# PIXELLLM_BENCH_ABSENT (comma-separated) treats installed packages as missing: the smoke
# test runs the placeholder path with it.
_ABSENT = set(filter(None, os.environ.get("PIXELLLM_BENCH_ABSENT", "").split(",")))
PLACEHOLDERS = [root for root in _NOT_CALLED
                if root in _ABSENT or importlib.util.find_spec(root) is None]
sys.meta_path[:0] = [_Placeholder(root) for root in PLACEHOLDERS]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pixelllm_jax import decoding, losses, partitioning, tasks  # noqa: E402
from pixelllm_jax.batch import Batch, shift_right  # noqa: E402
from pixelllm_jax.lora import LoraConfig  # noqa: E402
from pixelllm_jax.model import PixelLLMModel  # noqa: E402
from pixelllm_jax.models.eva02 import EVA02Config  # noqa: E402
from pixelllm_jax.models.heads.localization import LocHeadConfig  # noqa: E402
from pixelllm_jax.models.pixel_llm import PixelLLMConfig  # noqa: E402
from pixelllm_jax.models.prompt_encoder import PromptEncoderConfig  # noqa: E402
from pixelllm_jax.models.prompt_extractor import PromptExtractorConfig  # noqa: E402
from pixelllm_jax.models.sam_vit import SamViTConfig  # noqa: E402
from pixelllm_jax.models.t5 import T5, T5Config  # noqa: E402
from pixelllm_jax.train import optim, trainer  # noqa: E402
from pixelllm_jax.train import state as state_lib  # noqa: E402

import model_flops  # noqa: E402  (scripts/, beside this file)


# ---- configs
def paper_config() -> PixelLLMConfig:
  """gin_configs/models/pixelllm_t5_xl.gin in Python (tests check the two agree)."""
  return PixelLLMConfig(
      image_size=384,
      eva02=EVA02Config(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=2730,
                        pretrain_grid=16),
      sam=SamViTConfig(patch_size=16, width=1280, depth=32, num_heads=16, mlp_dim=5120,
                       window_size=14, global_blocks=(7, 15, 23, 31), out_channels=256,
                       pretrain_grid=64),
      prompt_encoder=PromptEncoderConfig(embed_dim=256),
      extractor=PromptExtractorConfig(depth=6, width=512, num_heads=8, mlp_dim=2048,
                                      num_queries=32, output_dim=1024),
      t5=T5Config(vocab_size=32128, d_model=2048, num_heads=32, d_kv=64, d_ff=5120,
                  num_encoder_layers=24, num_decoder_layers=24, feed_forward="gated-gelu",
                  tie_word_embeddings=False, dropout_rate=0.1,
                  lora=LoraConfig(rank=32, scale=2.0, encoder_self=("q", "v"),
                                  decoder_self=("q", "v"), decoder_cross=("q", "v"))),
      loc_head=LocHeadConfig(hidden_dim=512, depth=4, points_per_token=2),
      frozen=("sam", "prompt_encoder", "t5"),
      loc_grad_to_lm=True)


def smoke_config() -> PixelLLMConfig:
  """Every tower at toy size (tests/model_fixtures.py's), frozen as the paper config, LoRA on."""
  return PixelLLMConfig(
      image_size=32,
      eva02=EVA02Config(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=48, pretrain_grid=4),
      sam=SamViTConfig(patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=32, window_size=2,
                       global_blocks=(1,), out_channels=16, pretrain_grid=2),
      prompt_encoder=PromptEncoderConfig(embed_dim=16),
      extractor=PromptExtractorConfig(depth=1, width=32, num_heads=2, mlp_dim=32, num_queries=4,
                                      output_dim=32),
      t5=T5Config(vocab_size=64, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                  num_decoder_layers=2, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, lora=LoraConfig(rank=4)),
      loc_head=LocHeadConfig(hidden_dim=32, depth=2),
      frozen=("sam", "prompt_encoder", "t5"))


def with_scan(config: PixelLLMConfig, scan: bool) -> tuple[PixelLLMConfig, list[str]]:
  """`config` with `scan` set on every tower config that has the field; (config, those towers)."""
  changes = {}
  for field in dataclasses.fields(config):
    sub = getattr(config, field.name)
    if dataclasses.is_dataclass(sub) and "scan" in {f.name for f in dataclasses.fields(sub)}:
      changes[field.name] = dataclasses.replace(sub, scan=scan)
  return dataclasses.replace(config, **changes), sorted(changes)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each part runs at, per mode."""
  matmul_n: int
  matmul_iters: int
  matmul_trials: int
  train_shape: model_flops.BatchShape
  warmup_steps: int
  timed_steps: int
  decode_seqs: int
  decode_len: int
  encoder_len: int
  decode_repeats: int


# The train batch is runs/refcoco_t5_xl.gin's per image (1 prompt, 16 slots of 40 target and
# 40 context tokens); decoding reads 32 visual + 40 context encoder tokens per sequence.
GPU = Sizes(matmul_n=8192, matmul_iters=20, matmul_trials=5,
            train_shape=model_flops.BatchShape(batch=16, num_prompts=1, num_slots=16, length=40,
                                               context_length=40),
            warmup_steps=2, timed_steps=5,
            decode_seqs=64, decode_len=32, encoder_len=72, decode_repeats=3)
SMOKE = Sizes(matmul_n=128, matmul_iters=2, matmul_trials=2,
              train_shape=model_flops.BatchShape(batch=2, num_prompts=2, num_slots=3, length=6,
                                                 context_length=4),
              warmup_steps=1, timed_steps=2,
              decode_seqs=8, decode_len=6, encoder_len=12, decode_repeats=1)


def random_batch(shape: model_flops.BatchShape, image_size: int, vocab: int, points: int,
                 seed: int = 0) -> Batch:
  """A well-formed random numpy Batch of `shape` (referring slots: words, EOS, pad)."""
  r = np.random.RandomState(seed)
  b, k, n, length, lc = (shape.batch, shape.num_prompts, shape.num_slots, shape.length,
                         shape.context_length)

  def text(width):
    words = r.randint(3, vocab, size=(b, n, width))
    ends = r.randint(1, width, size=(b, n, 1))
    pos = np.arange(width)
    return np.where(pos < ends, words, np.where(pos == ends, 1, 0)).astype(np.int32)

  corners = np.sort(r.rand(b, k, 2, 2), axis=2)
  targets = text(length)
  weights = (targets > 0).astype(np.float32)
  return Batch(
      image=r.randint(0, 256, size=(b, image_size, image_size, 3)).astype(np.uint8),
      image_valid_hw=np.ones((b, 2), np.float32),
      prompt_boxes=np.concatenate([corners[:, :, 0], corners[:, :, 1]], -1).astype(np.float32),
      prompt_index=r.randint(0, k, size=(b, n)).astype(np.int32),
      context_tokens=text(lc), decoder_input_tokens=shift_right(targets),
      decoder_target_tokens=targets, decoder_loss_weights=weights,
      point_targets=r.rand(b, n, length, points, 2).astype(np.float32), point_weights=weights,
      task_ids=np.full((b, n), tasks.TASK_ID["refer"], np.int32))


class _AotPartitioner(partitioning.Partitioner):
  """A Partitioner whose `jit` returns the `jax.jit` object itself, so the training loop's
  own step can be lowered and compiled ahead of time (inside `context()`)."""

  def jit(self, fn, *, in_shardings=None, out_shardings=None, donate_argnums=(),
          static_argnames=()):
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums, static_argnames=static_argnames)


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ---- parts
def bench_matmul(sizes: Sizes) -> dict:
  n = sizes.matmul_n
  keys = jax.random.split(jax.random.key(0), 2)
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(sizes.matmul_trials):
    start = time.perf_counter()
    for _ in range(sizes.matmul_iters):
      out = matmul(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / sizes.matmul_iters)
  return {"n": n, "dtype": "bfloat16", "seconds_per_matmul": best,
          "peak_tflops": 2 * n ** 3 / best / 1e12}


def train_model(config: PixelLLMConfig) -> PixelLLMModel:
  """The model the train part runs: bf16 compute, float32 master weights, remat per block, the
  losses of runs/refcoco_t5_xl.gin."""
  return PixelLLMModel(config, loss=losses.LossConfig(label_smoothing=0.1, point_loss_weight=38.4),
                       dtype=partitioning.DtypePolicy(compute_dtype="bfloat16"),
                       remat=partitioning.RematPolicy(mode="block"))


def bench_train(config: PixelLLMConfig, sizes: Sizes, shape: model_flops.BatchShape,
                peak_tflops: float | None) -> dict:
  model = train_model(config)
  partitioner = _AotPartitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  optimizer = optim.with_frozen(
      optim.make_optimizer(learning_rate=5e-5, warmup_steps=1000, total_steps=120000,
                           weight_decay=0.0), model.trainable)
  batch = random_batch(shape, config.image_size, config.t5.vocab_size,
                       config.loc_head.points_per_token)
  start = time.perf_counter()
  # Parameter shapes do not depend on the batch: initialize on the smallest one.
  spec = state_lib.state_spec(model, model.abstract_batch(), optimizer, partitioner)
  with partitioner.context():
    state = jax.block_until_ready(spec.init(partitioner.replicate(jax.random.key(0))))
  init_s = time.perf_counter() - start

  step = trainer.make_train_step(model, optimizer, partitioner=partitioner,
                                 state_shardings=spec.shardings)
  batch = partitioner.shard_batch(batch)
  rng = partitioner.replicate(jax.random.key(1))
  start = time.perf_counter()
  with partitioner.context():
    lowered = step.lower(state, batch, rng)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s

  losses_seen = []
  for _ in range(sizes.warmup_steps):
    state, metrics = compiled(state, batch, rng)
    losses_seen.append(float(metrics["loss"]))
  start = time.perf_counter()
  for _ in range(sizes.timed_steps):
    state, metrics = compiled(state, batch, rng)
  losses_seen.append(float(metrics["loss"]))  # waits for the last step
  step_s = (time.perf_counter() - start) / sizes.timed_steps

  flops = model_flops.train_step_flops(config, shape)
  xla_flops = _cost_flops(compiled)
  memory = compiled.memory_analysis()
  achieved = flops["total"] / step_s / 1e12
  return {
      "batch": dataclasses.asdict(shape), "compute_dtype": "bfloat16", "param_dtype": "float32",
      "remat": "block", "init_seconds": init_s, "lower_seconds": lower_s,
      "compile_seconds": compile_s, "step_seconds": step_s,
      "examples_per_second": shape.batch / step_s,
      "model_tflops_per_step": flops["total"] / 1e12,
      "model_tflops_forward": flops["forward"] / 1e12,
      "model_tflops_by_part": {k: (v["forward"] + v["backward"]) / 1e12
                               for k, v in flops["per_part"].items()},
      "xla_tflops_per_step": None if xla_flops is None else xla_flops / 1e12,
      "achieved_model_tflops": achieved,
      "mfu": None if not peak_tflops else achieved / peak_tflops,
      "mfu_flops": "analytic (scripts/model_flops.py)",
      "peak_bytes_in_use": _peak_bytes(),
      "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "xla_argument_bytes": getattr(memory, "argument_size_in_bytes", None),
      "losses": losses_seen, "losses_finite": bool(np.all(np.isfinite(losses_seen))),
  }


def _time_decode(fn: Callable, args: tuple, repeats: int) -> tuple[Any, float, float]:
  """(tokens, compile seconds, best seconds per call) of a jitted decode."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  tokens = compiled(*args).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(*args).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return np.asarray(tokens), compile_s, best


def bench_decode(t5_config: T5Config, sizes: Sizes, dtype: str) -> dict:
  cfg = dataclasses.replace(t5_config, dtype=jnp.dtype(dtype), dropout_rate=0.0)
  if "scan" in {f.name for f in dataclasses.fields(cfg)}:
    cfg = dataclasses.replace(cfg, scan=False)
  module = T5(cfg)
  s, le, length = sizes.decode_seqs, sizes.encoder_len, sizes.decode_len
  encoded = jax.random.normal(jax.random.key(2), (s, le, cfg.d_model), jnp.float32)
  mask = jnp.ones((s, le), bool)
  init = jax.jit(lambda rng: module.init(rng, encoded, mask, jnp.zeros((s, length), jnp.int32),
                                         method=T5.decode)["params"])
  params = partitioning.DtypePolicy(param_dtype=dtype).cast_params(init(jax.random.key(3)))

  def cached(params, encoded, mask):
    _, empty = module.apply({"params": params}, encoded, mask, jnp.zeros((s, length), jnp.int32),
                            decode=True, mutable=["cache"], method=T5.decode)

    def step(tokens_Sx1, cache):
      (logits, _), updated = module.apply({"params": params, "cache": cache}, encoded, mask,
                                          tokens_Sx1, decode=True, mutable=["cache"],
                                          method=T5.decode)
      return logits[:, 0], updated["cache"]
    # eos_id -1 is never emitted: every run generates all `length` tokens.
    return decoding.greedy_decode(step, empty["cache"], batch_shape=(s,), max_len=length,
                                  eos_id=-1)

  def rerun(params, encoded, mask):
    def step(tokens_Sx1, state):
      prefix, index = state
      prefix = jax.lax.dynamic_update_slice(prefix, tokens_Sx1, (0, index))
      logits, _ = module.apply({"params": params}, encoded, mask, prefix, method=T5.decode)
      return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False), (prefix,
                                                                                    index + 1)
    state = (jnp.zeros((s, length), jnp.int32), jnp.array(0, jnp.int32))
    return decoding.greedy_decode(step, state, batch_shape=(s,), max_len=length, eos_id=-1)

  args = (params, encoded, mask)
  cached_tokens, cached_compile_s, cached_s = _time_decode(cached, args, sizes.decode_repeats)
  rerun_tokens, rerun_compile_s, rerun_s = _time_decode(rerun, args, sizes.decode_repeats)
  return {
      "sequences": s, "generated_tokens": length, "encoder_tokens": le,
      "decoder_layers": cfg.num_decoder_layers, "d_model": cfg.d_model, "dtype": dtype,
      "cached_ms_per_step": 1e3 * cached_s / length, "rerun_ms_per_step": 1e3 * rerun_s / length,
      "speedup": rerun_s / cached_s, "cached_compile_seconds": cached_compile_s,
      "rerun_compile_seconds": rerun_compile_s,
      "tokens_match": float(np.mean(cached_tokens == rerun_tokens)),
  }


# ---- driver
PARTS = ("matmul", "train", "decode")
# Least time (s) a part needs on a GPU to be worth starting (compiles included).
NEEDS = {"matmul": 15, "train": 150, "decode": 60}


def _summary(report: dict) -> str:
  lines = [f"benchmark ({report['mode']}, {report['device']}):"]
  m, t, d = (report.get(p) or {} for p in PARTS)
  if "peak_tflops" in m:
    lines.append(f"  bf16 matmul peak {m['peak_tflops']:.1f} TFLOP/s (n={m['n']})")
  if "step_seconds" in t:
    mfu = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
    peak = t["peak_bytes_in_use"]
    lines.append(
        f"  train: {t['examples_per_second']:.2f} examples/s ({t['step_seconds']:.3f} s/step, "
        f"batch {t['batch']['batch']}), {t['model_tflops_per_step']:.1f} model TFLOP/step, "
        f"MFU {mfu}, peak memory "
        + ("n/a" if peak is None else f"{peak / 2 ** 30:.1f} GiB")
        + f", compile {t['compile_seconds']:.0f} s")
  if "cached_ms_per_step" in d:
    lines.append(f"  decode ({d['sequences']} seqs): cached {d['cached_ms_per_step']:.2f} ms/step, "
                 f"re-run {d['rerun_ms_per_step']:.2f} ms/step, {d['speedup']:.1f}x; tokens "
                 f"match {d['tokens_match']:.3f}")
  for part in PARTS:
    if isinstance(report.get(part), dict) and "skipped" in report[part]:
      lines.append(f"  {part}: skipped ({report[part]['skipped']})")
    if isinstance(report.get(part), dict) and "error" in report[part]:
      lines.append(f"  {part}: error {report[part]['error']}")
  return "\n".join(lines)


def _train_fitting(config, sizes: Sizes, train_batch: int | None, report: dict,
                   budget_seconds: float | None, start: float) -> dict:
  """The train part at the requested batch, halved while the device runs out of memory (and
  the budget allows another compile); earlier attempts are listed under 'out_of_memory'."""
  shape = sizes.train_shape
  if train_batch:
    shape = dataclasses.replace(shape, batch=train_batch)
  peak = (report.get("matmul") or {}).get("peak_tflops")
  failed = []
  while True:
    try:
      result = bench_train(config, sizes, shape, peak)
      return {**result, "out_of_memory": failed} if failed else result
    except Exception as e:  # pylint: disable=broad-except
      left = None if budget_seconds is None else budget_seconds - (time.perf_counter() - start)
      if ("RESOURCE_EXHAUSTED" not in str(e) or shape.batch < 2
          or (left is not None and left < NEEDS["train"])):
        raise
      failed.append({"batch": shape.batch, "error": str(e)[:300]})
      shape = dataclasses.replace(shape, batch=shape.batch // 2)


def run(mode: str, parts: list[str], out: str | None, train_batch: int | None,
        budget_seconds: float | None, scan: bool) -> dict:
  start = time.perf_counter()
  sizes = GPU if mode == "gpu" else SMOKE
  config = paper_config() if mode == "gpu" else smoke_config()
  config, scanned = with_scan(config, scan)
  device = jax.devices()[0]
  report: dict[str, Any] = {
      "mode": mode, "device": f"{device.platform}:{device.device_kind}",
      "jax": jax.__version__, "placeholder_imports": PLACEHOLDERS, "scan_towers": scanned}

  def save(part: str) -> None:
    print(json.dumps({part: report[part]}), flush=True)
    if out:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      with open(out, "w") as f:
        json.dump(report, f, indent=1)

  for part in parts:
    left = None if budget_seconds is None else budget_seconds - (time.perf_counter() - start)
    if left is not None and left < NEEDS[part]:
      report[part] = {"skipped": f"{left:.0f} s of the budget left, needs about {NEEDS[part]} s"}
      save(part)
      continue
    try:
      if part == "matmul":
        report[part] = bench_matmul(sizes)
      elif part == "train":
        report[part] = _train_fitting(config, sizes, train_batch, report, budget_seconds, start)
      elif part == "decode":
        report[part] = bench_decode(config.t5, sizes,
                                    "bfloat16" if mode == "gpu" else "float32")
    except Exception as e:  # pylint: disable=broad-except  (one part failing keeps the others)
      report[part] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    save(part)
  report["seconds"] = time.perf_counter() - start
  save("seconds")
  print(_summary(report), flush=True)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("gpu", "cpu_smoke"), default=None,
                      help="default: gpu when a GPU is present, else cpu_smoke")
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--out", default=None, help="default: $OUT/benchmark.json if OUT is set")
  parser.add_argument("--train_batch", type=int, default=None, help="images per train step")
  parser.add_argument("--budget_seconds", type=float, default=None)
  parser.add_argument("--scan", choices=("on", "off"), default="on",
                      help="scan the layers of every tower config with a `scan` field")
  args = parser.parse_args(argv)
  mode = args.mode or ("gpu" if jax.default_backend() == "gpu" else "cpu_smoke")
  if mode == "gpu" and jax.default_backend() != "gpu":
    parser.error(f"--mode=gpu needs a GPU; jax sees {jax.default_backend()}")
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; choose from {PARTS}")
  out = args.out or (os.path.join(os.environ["OUT"], "benchmark.json")
                     if os.environ.get("OUT") else None)
  report = run(mode, parts, out, args.train_batch, args.budget_seconds, args.scan == "on")
  return 1 if any("error" in (report.get(p) or {}) for p in parts) else 0


if __name__ == "__main__":
  sys.exit(main())
