"""The compile-time pod check (pixelllm_jax/scale_check/) on the fake CPU mesh, toy model.

The train step and the cached decoding step are compiled from abstract inputs for the 8 fake
CPU devices (tests/conftest.py) with the `fsdp` rule set over all of them, and XLA's report is
checked against what the layout implies: memory and FLOPs are positive, the donated state is
aliased, each chip holds less than the whole state (the parameters and Adam moments are split)
but at least its even share, and each chip computes about an eighth of the step's FLOPs. The
abstract-mesh context the TPU path needs lowers the same program as `jax.set_mesh`. No TPU or
libtpu needed.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

import model_fixtures as mf
from xla_env import xla_flags
from pixelllm_jax.convert import assemble
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.models.t5 import T5_1_1_SIZES
from pixelllm_jax.partitioning import RULE_SETS, Partitioner
from pixelllm_jax.scale_check import aot, gpu_targets, model_choice
from pixelllm_jax.scale_check.__main__ import rule_table
from pixelllm_jax.train import optim, state as state_lib

SHAPE = aot.BatchShape(batch=8, num_slots=2, num_prompts=1, length=6, context_length=4)
GIB = 1024 ** 3


def _model():
  # EVA02 left out: the SAM-only toy compiles its train step in about half the time.
  return PixelLLMModel(mf.toy_config(lora_rank=2, eva02=False, frozen=("sam", "prompt_encoder")))


@pytest.fixture(scope="module")
def reports():
  model = _model()
  tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=2,
                                              weight_decay=0.0), model.trainable)
  reports = list(aot.check(model, tx, SHAPE, devices=jax.devices(), mesh_shape=(1, -1, 1),
                           rules="fsdp", hbm_gib=1.0))
  return model, tx, Partitioner((1, -1, 1), "fsdp"), reports


def _state_bytes(model, tx, partitioner) -> int:
  spec = state_lib.state_spec(model, model.abstract_batch(), tx, partitioner)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(spec.abstract))


def test_train_report(reports):
  model, tx, partitioner, (train, _) = reports
  assert (train.step, train.target, train.devices, train.rules, train.mesh) == (
      "train", "cpu", 8, "fsdp", "1x8x1")
  assert train.batch == "8x2x6"
  assert train.params_b * 1e9 == sum(x.size for x in jax.tree.leaves(
      assemble.abstract_params(model)))
  assert 0 < train.trainable_b < train.params_b  # SAM and the prompt encoder are frozen
  for name in ("argument_gib", "output_gib", "temp_gib", "peak_gib", "tflops",
               "xla_tflops_per_chip"):
    assert getattr(train, name) > 0, name
  state = _state_bytes(model, tx, partitioner) / GIB
  # fsdp splits every parameter's model width over the 8 chips: a chip holds less than the
  # state, and no less than an even share of it.
  assert state / 8 <= train.argument_gib < state
  assert 0 < train.alias_gib <= train.output_gib  # the donated state is updated in place
  assert train.peak_gib == pytest.approx(
      train.argument_gib + train.output_gib - train.alias_gib + train.temp_gib)
  # The step's FLOPs (the whole step lowered for one device) are shared by the 8 chips, each
  # taking an even share of the batch: the compiled per-chip count is near an eighth (the SPMD
  # program adds a little, XLA's simplifications remove a little).
  assert 8 * train.xla_tflops_per_chip == pytest.approx(train.tflops, rel=0.25)
  assert train.fits is (train.peak_gib <= 1.0)
  assert train.compile_s > 0 and train.lower_s > 0


def test_decode_report(reports):
  model, tx, partitioner, (train, decode) = reports
  assert decode.step == "decode" and decode.params_b == train.params_b
  for name in ("argument_gib", "output_gib", "tflops", "xla_tflops_per_chip"):
    assert getattr(decode, name) > 0, name
  assert decode.alias_gib > 0  # the donated KV cache
  # Every parameter stays an argument (an evaluation holds them all), split as in training.
  params = state_lib.state_spec(model, model.abstract_batch(), tx, partitioner).abstract.params
  assert decode.argument_gib >= sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)
                                    ) / 8 / GIB
  # One token per slot costs far less than a training step over L tokens with its backward.
  assert decode.tflops < train.tflops / SHAPE.length


def test_report_line_and_json(reports):
  *_, (train, _) = reports
  line = train.line()
  assert "rules=fsdp" in line and "mesh=1x8x1" in line and "TFLOP/step" in line
  assert dataclasses.asdict(train)["argument_gib"] == train.argument_gib


def test_t5_size_and_scan_switches():
  config = mf.toy_config()
  xxl = model_choice.with_t5_size(config, "xxl")
  assert model_choice.t5_size_name(xxl.t5) == "xxl"
  assert (xxl.t5.d_model, xxl.t5.d_ff) == T5_1_1_SIZES["xxl"][0:1] + T5_1_1_SIZES["xxl"][3:4]
  assert xxl.t5.lora == config.t5.lora and xxl.t5.vocab_size == config.t5.vocab_size
  with pytest.raises(ValueError, match="choose from"):
    model_choice.with_t5_size(config, "huge")


@dataclasses.dataclass(frozen=True)
class _Scans:
  scan: bool = False


@dataclasses.dataclass(frozen=True)
class _Plain:
  width: int = 1


@dataclasses.dataclass(frozen=True)
class _Composer:
  a: _Scans = _Scans()
  b: _Scans = _Scans()
  c: _Plain = _Plain()
  size: int = 3


def test_scan_switch():
  config = _Composer()
  assert model_choice.scan_towers(config) == ["a", "b"]
  scanned, scan = model_choice.with_scan(config, True)
  assert scan is True and scanned == _Composer(a=_Scans(True), b=_Scans(True))
  assert model_choice.with_scan(scanned, None) == (scanned, True)   # the config's own
  assert model_choice.with_scan(_Composer(a=_Scans(True)), None)[1] is None  # towers disagree
  # A config whose towers cannot scan is left alone and reported as such (None).
  assert model_choice.with_scan(_Plain(), True) == (_Plain(), None)


def test_cache_axes():
  assert aot.cache_logical_axes(0) == ()
  assert aot.cache_logical_axes(4) == ("batch", "length", "heads", "kv")
  assert aot.cache_logical_axes(5) == ("layers", "batch", "length", "heads", "kv")
  assert aot.cache_logical_axes(1) == (None,)  # a scanned decoder's index, one per layer


def test_rule_overrides():
  assert rule_table("fsdp", []) == ("fsdp", "fsdp")
  table, label = rule_table("fsdp_tp", ["mlp=", "vocab=fsdp+model"])
  assert label == "fsdp_tp[mlp=,vocab=fsdp+model]"
  expected = dict(RULE_SETS["fsdp_tp"], mlp=None, vocab=("fsdp", "model"))
  assert dict(table) == expected and len(table) == len(RULE_SETS["fsdp_tp"])
  with pytest.raises(ValueError, match="NAME=AXES"):
    rule_table("fsdp", ["widths=model"])


def test_abstract_mesh_context_lowers_the_same_program():
  """AotPartitioner names its mesh abstractly (so the state spec's eager ops stay on this CPU
  when the mesh is a TPU topology's); on a mesh both can use, the lowered train step equals the
  one lowered under `Partitioner.context` (jax.set_mesh), shardings and constraints included."""

  class UnderSetMesh(aot.AotPartitioner):
    context = Partitioner.context

  model = _model()
  tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=2,
                                              weight_decay=0.0), model.trainable)
  texts = [aot.lower_train(model, tx, cls((2, 2, 2), "fsdp_tp"), SHAPE)[0].as_text()
           for cls in (aot.AotPartitioner, UnderSetMesh)]
  assert "sharding" in texts[0]
  assert texts[0] == texts[1]


def test_command_line_cpu_mesh(tmp_path):
  """`python -m pixelllm_jax.scale_check --cpu_devices=2` on the tiny gin model: one decode step
  compiled, its table line printed and its JSON line appended to --json_out."""
  out = tmp_path / "scale.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8)}
  proc = subprocess.run(
      [sys.executable, "-m", "pixelllm_jax.scale_check", "--cpu_devices=2",
       "--gin_file=models/tiny.gin", "--steps=decode", "--rules=fsdp", "--mesh=1,-1,1",
       "--batch=4", "--num_slots=2", "--length=8", "--context_length=8", "--hbm_gib=1",
       f"--json_out={out}"], env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report, = [json.loads(line) for line in out.read_text().splitlines()]
  assert (report["step"], report["target"], report["devices"], report["mesh"], report["batch"]) \
      == ("decode", "cpu", 2, "1x2x1", "4x2x8")
  assert report["argument_gib"] > 0 and report["tflops"] > 0 and report["fits"] is True
  assert report["t5"] == "d64" and report["scan"] in (None, False)  # tiny.gin does not scan
  assert any(line.startswith("decode cpu (2 x cpu)") for line in proc.stdout.splitlines())


class _Refused:
  """A lowered step the compiler refuses, as XLA's TPU compiler words it."""

  def __init__(self, message):
    self.message = message

  def compile(self, compiler_options=None):
    del compiler_options
    raise RuntimeError(self.message)


def test_out_of_memory_is_a_report_not_a_crash(reports):
  *_, (train, _) = reports
  oom = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (26.32G) exceeds available HBM (15.75G).\nmore lines")
  stats, error = aot.compile_or_oom(_Refused(oom))
  assert error == oom.splitlines()[0] and set(stats.values()) == {None}
  refused = dataclasses.replace(train, **stats, fits=False, error=error)
  assert "DOES NOT FIT: RESOURCE_EXHAUSTED" in refused.line()
  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
    aot.compile_or_oom(_Refused("INVALID_ARGUMENT: something else"))


def test_gpu_target_names_and_config():
  """`--gpu=h100[:N]` names one host of N H100s; the target config the CUDA plugin compiles
  against carries the part's figures (memory in bytes, SM count, compute capability 9.0)."""
  spec, count = gpu_targets.parse("h100:8")
  assert (spec.description, count) == ("NVIDIA H100 80GB HBM3", 8)
  assert gpu_targets.parse("h100") == (spec, 1)
  for bad in ("a100", "h100:0", "h100:x"):
    with pytest.raises(ValueError, match="--gpu"):
      gpu_targets.parse(bad)
  text = gpu_targets.target_config(spec)
  assert f"device_memory_size: {80 * GIB}\n" in text and "core_count: 132\n" in text
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text


def test_gpu_memory_is_the_share_jax_gives_xla(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert aot.memory_gib("NVIDIA H100 80GB HBM3") == 60.0  # jax's default 75%
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert aot.memory_gib("NVIDIA H100 80GB HBM3") == 72.0
  assert aot.memory_gib("TPU v5 lite") == 16.0 and aot.memory_gib("cpu") is None


def _has_cuda_plugin() -> bool:
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return True


@pytest.mark.skipif(not _has_cuda_plugin(),
                    reason="XLA's GPU compiler needs jax's CUDA plugin: pip install -e .[gpu_aot]")
def test_command_line_gpu_deviceless(tmp_path):
  """`--gpu=h100` compiles the tiny model's decode step with XLA's GPU compiler on this CPU
  machine (no GPU, no driver) and compares its memory with the 60 GiB of the H100's 80 that
  jax gives XLA by default."""
  out = tmp_path / "scale.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8),
         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75"}
  proc = subprocess.run(
      [sys.executable, "-m", "pixelllm_jax.scale_check", "--gpu=h100",
       "--gin_file=models/tiny.gin", "--steps=decode", "--rules=dp", "--mesh=1,1,1",
       "--batch=4", "--num_slots=2", "--length=8", "--context_length=8", f"--json_out={out}"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report, = [json.loads(line) for line in out.read_text().splitlines()]
  assert (report["target"], report["devices"], report["device_kind"], report["hbm_gib"]) \
      == ("h100", 1, "NVIDIA H100 80GB HBM3", 60.0)
  assert report["argument_gib"] > 0 and report["fits"] is True
  assert report["xla_tflops_per_chip"] is None  # deviceless: no cost analysis
