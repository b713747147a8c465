"""scripts/benchmark_gpu.py (CPU smoke mode), its analytic FLOPs, and the GPU world config.

- The smoke run goes through every part in a subprocess that cannot import gin, tfds, grain or
  array_record (the GPU image lacks them) and with the caption scorer treated as missing (the
  placeholder path); its JSON report has every field, finite; cached and re-run decoding emit
  the same tokens.
- The model the benchmark trains is gin_configs/models/pixelllm_t5_xl.gin's, in Python.
- scripts/model_flops.py against XLA's own count of the same programs (forward, and forward plus
  the gradient of the trainable leaves, unoptimized HLO): the analytic count leaves out only
  element-wise work, so it must sit just below XLA's.
- scripts/world_gpu.py's flags build a model over runs/demo.gin (abstract init) at the sizes
  they name; scripts/gpu_checks.sh parses.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import cli, configurables
from pixelllm_jax.lora import LoraConfig
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.models.eva02 import EVA02Config
from pixelllm_jax.models.heads.localization import LocHeadConfig
from pixelllm_jax.models.pixel_llm import PixelLLMConfig
from pixelllm_jax.models.prompt_encoder import PromptEncoderConfig
from pixelllm_jax.models.prompt_extractor import PromptExtractorConfig
from pixelllm_jax.models.sam_vit import SamViTConfig
from pixelllm_jax.models.t5 import T5Config
from pixelllm_jax.tree_paths import path_of
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)
import model_flops  # noqa: E402
import world_gpu  # noqa: E402

DATA_STACK = ("gin", "tensorflow_datasets", "grain", "array_record")
# Runs the script with the data stack unimportable (None in sys.modules blocks an import).
_RUNNER = ("import runpy, sys\n"
           "for name in {blocked!r}: sys.modules[name] = None\n"
           "sys.path.insert(0, {scripts!r})\n"
           "sys.argv = ['benchmark_gpu.py'] + {args!r}\n"
           "runpy.run_path({script!r}, run_name='__main__')\n")


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and np.isfinite(value)


def test_cpu_smoke_report(tmp_path):
  out = tmp_path / "benchmark.json"
  code = _RUNNER.format(blocked=DATA_STACK, scripts=SCRIPTS,
                        script=os.path.join(SCRIPTS, "benchmark_gpu.py"),
                        args=["--mode=cpu_smoke", f"--out={out}"])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
         "PIXELLLM_BENCH_ABSENT": "pycocoevalcap"}
  env.pop("OUT", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "benchmark (cpu_smoke" in proc.stdout
  report = json.loads(out.read_text())
  assert report["mode"] == "cpu_smoke"
  assert report["placeholder_imports"] == ["pycocoevalcap"]
  matmul, train, decode = report["matmul"], report["train"], report["decode"]
  assert _finite(matmul["peak_tflops"]) and matmul["peak_tflops"] > 0
  for key in ("step_seconds", "examples_per_second", "model_tflops_per_step",
              "model_tflops_forward", "xla_tflops_per_step", "achieved_model_tflops", "mfu",
              "compile_seconds", "init_seconds"):
    assert _finite(train[key]) and train[key] > 0, key
  assert train["losses_finite"] and len(train["losses"]) == 2
  # The model FLOPs split over the towers adds up; the forward is part of the step.
  assert sum(train["model_tflops_by_part"].values()) == pytest.approx(
      train["model_tflops_per_step"], rel=1e-9)
  assert train["model_tflops_forward"] < train["model_tflops_per_step"]
  assert train["batch"]["batch"] == 2
  for key in ("cached_ms_per_step", "rerun_ms_per_step", "speedup", "cached_compile_seconds",
              "rerun_compile_seconds"):
    assert _finite(decode[key]) and decode[key] > 0, key
  assert decode["tokens_match"] == 1.0  # float32: the cache changes nothing
  assert _finite(report["seconds"])


def test_paper_config_is_the_gin_model():
  import benchmark_gpu  # pylint: disable=import-outside-toplevel  (imports jax models only)
  gin.clear_config()
  try:
    cli.parse_gin(["models/pixelllm_t5_xl.gin"], [])
    from_gin = configurables.REGISTERED["PixelLLMModel"][1]().config
  finally:
    gin.clear_config()
  config, scanned = benchmark_gpu.with_scan(benchmark_gpu.paper_config(), True)
  assert scanned == ["eva02", "sam", "t5"]
  # What the train part runs is the gin file's model, compute choices (bf16, remat, scan) too.
  assert benchmark_gpu.train_model(config).config == from_gin


def _config(*, frozen, lora_rank, points_per_side, width=128) -> PixelLLMConfig:
  """Matmul-heavy toy sizes: element-wise work is a small share, as at paper scale."""
  w = width
  return PixelLLMConfig(
      t5=T5Config(vocab_size=512, d_model=w, num_heads=4, d_kv=32, d_ff=2 * w,
                  num_encoder_layers=1, num_decoder_layers=1,
                  lora=LoraConfig(rank=lora_rank, encoder_self=("q", "v"),
                                  decoder_self=("q", "v"), decoder_cross=("q", "v"))),
      prompt_encoder=PromptEncoderConfig(embed_dim=64),
      extractor=PromptExtractorConfig(depth=1, width=w, num_heads=4, mlp_dim=2 * w,
                                      num_queries=8, output_dim=w),
      loc_head=LocHeadConfig(hidden_dim=64, depth=3),
      eva02=EVA02Config(patch_size=8, width=w, depth=1, num_heads=4, mlp_dim=2 * w,
                        pretrain_grid=4),
      sam=SamViTConfig(patch_size=16, width=w, depth=2, num_heads=4, mlp_dim=2 * w,
                       window_size=3, global_blocks=(1,), out_channels=32, pretrain_grid=4),
      image_size=64, frozen=frozen, prompt_points_per_side=points_per_side)


@pytest.mark.parametrize("frozen,lora_rank,points_per_side", [
    (("sam", "prompt_encoder", "t5"), 8, 0),  # the paper's freezing: LoRA trains in T5
    ((), 0, 3),                                # everything trains; a 3 x 3 point prompt
])
def test_analytic_flops_sit_just_below_xla(frozen, lora_rank, points_per_side):
  config = _config(frozen=frozen, lora_rank=lora_rank, points_per_side=points_per_side)
  shape = model_flops.BatchShape(batch=2, num_prompts=2, num_slots=3, length=6, context_length=4)
  model = PixelLLMModel(config)
  batch = model.abstract_batch(shape.batch, shape.num_slots, shape.num_prompts, shape.length,
                               shape.context_length)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.abstract_batch())
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), zeros)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  trains = [model.trainable(path_of(kp)) for kp, _ in leaves]

  def loss(trained, frozen_leaves, b):
    it, jt = iter(trained), iter(frozen_leaves)
    full = jax.tree.unflatten(treedef, [next(it) if t else next(jt) for t in trains])
    return model.loss(full, b, jax.random.key(0))[0]

  trained = [x for (_, x), t in zip(leaves, trains) if t]
  frozen_leaves = [x for (_, x), t in zip(leaves, trains) if not t]
  xla_step = jax.jit(jax.value_and_grad(loss)).lower(trained, frozen_leaves, batch)
  xla_forward = jax.jit(lambda p, b: model.apply(p, b)).lower(params, batch)
  ours = model_flops.train_step_flops(config, shape)
  assert 0.93 <= ours["forward"] / xla_forward.cost_analysis()["flops"] <= 1.0
  assert 0.93 <= ours["total"] / xla_step.cost_analysis()["flops"] <= 1.0
  if "sam" in frozen:  # a frozen input tower is cut from the backward pass
    assert ours["per_part"]["sam"]["backward"] == 0
  else:
    assert ours["per_part"]["sam"]["backward"] > ours["per_part"]["sam"]["forward"]


def test_world_gpu_flags_build_the_named_model():
  gin.clear_config()
  try:
    cli.parse_gin(["runs/demo.gin"], [f.removeprefix("--gin.") for f in world_gpu.gin_flags()]
                  + ["MODEL_DIR='unused'"])
    model = cli.build("train.model")
    batch_size = cli.build("train_data.batch_size")
  finally:
    gin.clear_config()
  named = dict(world_gpu.BINDINGS)
  assert batch_size == int(named["BATCH_SIZE"])
  assert model.config.eva02.patch_size == int(named["EVA02Config.patch_size"])
  assert model.config.t5.d_model == int(named["T5Config.d_model"])
  assert model.config.extractor.depth == int(named["PromptExtractorConfig.depth"])
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), model.abstract_batch())))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(params)))
  assert 29e6 < count < 33e6, count  # "about 31 M parameters" (scripts/world_gpu.py)


def test_world_schedule_for_budget():
  assert world_gpu.steps_for(300, 40.0) == 10800
  assert world_gpu.steps_for(10, 0.01) == 2
  with pytest.raises(ValueError):
    world_gpu.steps_for(300, 0.0)
  assert world_gpu.warmup_for(10800) == int(dict(world_gpu.BINDINGS)["make_optimizer.warmup_steps"])
  assert world_gpu.warmup_for(45) == 4  # a short run keeps a tenth as warm-up
  assert world_gpu.warmup_for(2) == 1


def test_gpu_checks_script_parses():
  subprocess.run(["bash", "-n", os.path.join(SCRIPTS, "gpu_checks.sh")], check=True)
