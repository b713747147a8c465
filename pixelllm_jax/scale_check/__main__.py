"""Command line of the pod check (see the package docstring for what it compiles).

  python -m pixelllm_jax.scale_check --topology=v5e:16x16 --rules=fsdp --mesh=1,-1,1 \\
      --remat=block --compute_dtype=bfloat16 --json_out=scale.jsonl

Gin flags as in training (pixelllm_jax/cli.py: --gin_file, --gin.NAME=VALUE); the default
config is the paper's (`runs/refcoco_t5_xl.gin`: T5-XL, 64 images x 16 slots, 384 px). The
batch shape comes from its `train_data` / `TaskConfig` bindings unless given.
"""
import dataclasses
import json
import os
import sys
from typing import Sequence

import jax
from absl import flags

from pixelllm_jax import cli, partitioning
from pixelllm_jax.scale_check import aot, gpu_targets, model_choice

flags.DEFINE_string("topology", None, "TPU topology name (v5e:4x4, v5e:16x16, v4:4x4x4, "
                    "v5p:4x4x4, v6e:16x16, ...); needs libtpu. Exclusive with --gpu and "
                    "--cpu_devices.")
flags.DEFINE_string("gpu", None, "NVIDIA GPU to compile for, deviceless: h100, or h100:N for one "
                    "host with N (gpu_targets.GPUS); needs jax's CUDA plugin, no GPU.")
flags.DEFINE_string("chip_config", None, "'default' or 'megacore' (default: megacore for v4 "
                    "and v5p, default otherwise).")
flags.DEFINE_integer("cpu_devices", None, "Compile for this many fake CPU devices instead "
                     "(XLA_FLAGS --xla_force_host_platform_device_count).")
flags.DEFINE_float("hbm_gib", None, "Memory per device to compare with (default: the TPU "
                   "chip's HBM; on a GPU the share jax gives XLA, 75% unless "
                   "XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise; none on CPU).")
flags.DEFINE_string("rules", "fsdp", "Rule set: dp, fsdp or fsdp_tp (partitioning.RULE_SETS).")
flags.DEFINE_multi_string("rule", [], "Override one rule of --rules: NAME=AXES with AXES a mesh "
                          "axis, axes joined by '+', or empty for replicated (e.g. mlp= keeps "
                          "the MLP width whole); repeatable.")
flags.DEFINE_string("mesh", "1,-1,1", "Mesh shape data,fsdp,model (one -1 takes the rest).")
flags.DEFINE_integer("batch", None, "Global batch, images (default: train_data.batch_size).")
flags.DEFINE_integer("num_slots", None, "Caption slots per image (default: train_data's).")
flags.DEFINE_integer("num_prompts", None, "Prompts per image (default: train_data's).")
flags.DEFINE_integer("length", None, "Decoder length L (default: TaskConfig.max_target_len).")
flags.DEFINE_integer("context_length", None,
                     "Text-prompt length Lc (default: TaskConfig.max_context_len).")
flags.DEFINE_string("remat", None, "RematPolicy.mode for every tower (default: the config's).")
flags.DEFINE_string("compute_dtype", None, "DtypePolicy.compute_dtype (default: the config's).")
flags.DEFINE_string("t5", None, "T5 v1.1 size replacing the config's: xxl is Flan-T5-XXL "
                    "(LoRA and vocabulary kept).")
flags.DEFINE_bool("scan", None, "Scan over the layers of every tower that can (default: the "
                  "config's); reported 'scan n/a' while no tower config has a `scan` field.")
flags.DEFINE_list("steps", list(aot.STEPS), "What to compile: train, decode.")
flags.DEFINE_string("json_out", None, "Append each report's JSON line to this file.")

FLAGS = flags.FLAGS

DEFAULT_GIN_FILE = "runs/refcoco_t5_xl.gin"

# The batch shape when not given: (gin binding, fallback when unbound).
BATCH_SOURCES = {
    "batch": ("train_data.batch_size", 64),
    "num_slots": ("train_data.num_slots", 1),
    "num_prompts": ("train_data.num_prompts", 1),
    "length": ("TaskConfig.max_target_len", 40),
    "context_length": ("TaskConfig.max_context_len", 40),
}


def setup_backend(topology: str | None, cpu_devices: int | None, gpu: str | None = None) -> None:
  """Process settings, before jax creates its CPU backend (which reads XLA_FLAGS)."""
  if sum(x is not None for x in (topology, cpu_devices, gpu)) != 1:
    raise ValueError("give exactly one of --topology, --gpu and --cpu_devices")
  if cpu_devices is not None:
    count = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count + "=")]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{count}={cpu_devices}"])
  elif topology is not None:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server to ask
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) against two processes driving
    # the same chips; this one only compiles, so another jax process that loaded libtpu
    # (any started without JAX_PLATFORMS=cpu) must not stop it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # (--gpu: jax's CUDA plugin builds a compile-only client from the target config.)
  # The process itself stays on CPU; a topology's or GPU's devices are only compiled for.
  jax.config.update("jax_platforms", "cpu")


def rule_table(rules: str, overrides: Sequence[str]) -> tuple[str | partitioning.Rules, str]:
  """(rule set name or table, its label) from --rules and --rule overrides."""
  if not overrides:
    return rules, rules
  table = dict(partitioning.rules_of(rules))
  for item in overrides:
    name, sep, axes = item.partition("=")
    if not sep or name not in table:
      raise ValueError(f"--rule={item!r}: give NAME=AXES with NAME one of {sorted(table)}")
    parts = tuple(a for a in axes.split("+") if a)
    table[name] = None if not parts else parts[0] if len(parts) == 1 else parts
  return tuple(table.items()), f"{rules}[{','.join(overrides)}]"


def main(argv: Sequence[str]) -> list[aot.Report]:
  setup_backend(FLAGS.topology, FLAGS.cpu_devices, FLAGS.gpu)
  if not FLAGS.gin_file:
    FLAGS.gin_file = [DEFAULT_GIN_FILE]
  cli.start(argv)
  choices = model_choice.Choices(remat=FLAGS.remat, compute_dtype=FLAGS.compute_dtype,
                                 t5=FLAGS.t5, scan=FLAGS.scan)
  model, optimizer, scan = model_choice.build_model(choices)
  if FLAGS.scan is not None and scan is None:
    print("--scan: no tower config has a `scan` field in this version; compiling unrolled",
          file=sys.stderr)
  # XLA counts a scanned loop's body once: the FLOPs come from the same model unrolled.
  unrolled = None
  if scan:
    unrolled = model_choice.build_model(dataclasses.replace(choices, scan=False))[:2]
  shape = aot.BatchShape(**{
      name: getattr(FLAGS, name) if getattr(FLAGS, name) is not None
      else model_choice.gin_value(binding, fallback)
      for name, (binding, fallback) in BATCH_SOURCES.items()})
  rules, rules_label = rule_table(FLAGS.rules, FLAGS.rule)
  if FLAGS.topology is not None:
    devices = aot.tpu_devices(FLAGS.topology, FLAGS.chip_config)
  elif FLAGS.gpu is not None:
    devices = gpu_targets.devices(FLAGS.gpu)
  else:
    devices = jax.devices("cpu")
    if len(devices) != FLAGS.cpu_devices:
      raise RuntimeError(f"asked for {FLAGS.cpu_devices} CPU devices, jax has {len(devices)}")
  reports = []
  for report in aot.check(model, optimizer, shape, devices=devices,
                          mesh_shape=[int(x) for x in FLAGS.mesh.split(",")], rules=rules,
                          rules_label=rules_label,
                          steps=FLAGS.steps, target=FLAGS.topology or FLAGS.gpu or "cpu",
                          hbm_gib=FLAGS.hbm_gib, t5=model_choice.t5_size_name(model.config.t5),
                          scan=scan, unrolled=unrolled,
                          compiler_options=gpu_targets.COMPILER_OPTIONS if FLAGS.gpu else None):
    line = json.dumps(dataclasses.asdict(report))
    print(report.line(), line, sep="\n", flush=True)
    if FLAGS.json_out:
      with open(FLAGS.json_out, "a") as f:
        f.write(line + "\n")
    reports.append(report)
  return reports


if __name__ == "__main__":
  cli.run(main)
