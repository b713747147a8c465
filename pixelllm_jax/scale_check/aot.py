"""Compiling the train and decode steps from abstract inputs, and reading XLA's report.

Nothing here allocates a model-sized array: parameters, optimizer state, batch, KV cache and
encoder outputs are `jax.ShapeDtypeStruct`s with their shardings, found with `jax.eval_shape`.
The steps are the project's own: `trainer.make_train_step` on `state.state_spec`'s state, and
the composer's cached `PixelLLM.decode` as `decoding.greedy_decode_pixel_llm` calls it.
"""
import contextlib
import dataclasses
import time
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pixelllm_jax.models.pixel_llm import PixelLLM
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.scale_check import gpu_targets
from pixelllm_jax.train import state as state_lib
from pixelllm_jax.train import trainer
from pixelllm_jax.tree_paths import path_of

GIB = 1024 ** 3

# HBM per chip (public specs), by the device_kind libtpu reports.
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v6 lite": 32.0}

STEPS = ("train", "decode")


def memory_gib(device_kind: str) -> float | None:
  """The memory a step may use per device: a TPU chip's HBM; on a GPU, the share of it a jax
  process gives XLA (gpu_targets.usable_gib); None where unknown (CPU)."""
  spec = gpu_targets.by_kind(device_kind)
  return gpu_targets.usable_gib(spec) if spec else HBM_GIB.get(device_kind)


def tpu_devices(topology: str, chip_config: str | None = None) -> list:
  """The devices of a TPU topology such as 'v5e:4x4' or 'v4:4x4x4' (descriptions the TPU
  compiler targets; no TPU needed, libtpu is). `chip_config` defaults to 'megacore' for v4 and
  v5p (one device per chip), 'default' otherwise."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if chip_config is None:
    chip_config = "megacore" if topology.split(":")[0] in ("v4", "v5p") else "default"
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=chip_config, num_slices=1)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"TPU topology {topology!r} ({chip_config}) did not resolve: {e}\n"
                       "(the TPU compiler comes with libtpu: pip install -e .[tpu_aot])") from e
  return list(desc.devices)


class AotPartitioner(Partitioner):
  """A `Partitioner` for compiling only, on devices this process may not have.

  Two differences, both about *where* things run, not the layout: its context names the mesh
  abstractly (`use_abstract_mesh`: flax's logical constraints resolve as under `set_mesh`, but
  the small eager ops of building the state spec, e.g. `jax.random.key(0)`, still run on this
  process's CPU instead of being sent to the TPU mesh), and its `jit` returns jax's jitted
  function, which can be lowered (`Partitioner.jit` wraps it in a call that enters the context,
  which jax refuses inside a trace).
  """

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(
        self.rules):
      yield

  def jit(self, fn: Any, **kwargs: Any) -> Any:
    return jax.jit(fn, **{k: v for k, v in kwargs.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """B images, N caption slots, K prompts, L decoder tokens, Lc context tokens per slot."""
  batch: int
  num_slots: int
  num_prompts: int
  length: int
  context_length: int

  def __str__(self) -> str:
    return f"{self.batch}x{self.num_slots}x{self.length}"

  def abstract(self, model: Any, partitioner: Partitioner) -> Any:
    """The model's Batch of ShapeDtypeStructs, split over the batch axes."""
    batch = model.abstract_batch(self.batch, self.num_slots, self.num_prompts, self.length,
                                 self.context_length)
    return _with_sharding(batch, jax.tree.map(lambda _: partitioner.batch_sharding(), batch))


@dataclasses.dataclass
class Report:
  """One compiled step on one layout (memory per chip in GiB, FLOPs in TFLOP)."""
  step: str                  # 'train' or 'decode'
  target: str                # TPU topology name, or 'cpu'
  devices: int
  device_kind: str
  hbm_gib: float | None      # per chip: the memory compared with (`memory_gib`)
  rules: str
  mesh: str                  # data x fsdp x model
  remat: str                 # the T5's (RematPolicy.mode unless overridden per tower)
  compute_dtype: str
  t5: str                    # T5 v1.1 size name
  scan: bool | None          # None: no tower config can scan (not in this version)
  batch: str                 # B x N x L
  params_b: float            # parameters, billions
  trainable_b: float
  # Memory per chip; None when the compiler refused the step for want of memory (`error`).
  argument_gib: float | None
  output_gib: float | None
  alias_gib: float | None
  temp_gib: float | None
  peak_gib: float | None     # argument + output - alias + temp
  fits: bool | None          # peak <= HBM (None: no HBM to compare with)
  tflops: float              # the step, all chips (the unrolled step on one device)
  xla_tflops_per_chip: float | None  # as compiled (a scanned loop's body counted once; None:
                                     # the compiler gives no count, as deviceless for a GPU)
  lower_s: float
  compile_s: float
  error: str | None = None   # the compiler's out-of-memory message

  def line(self) -> str:
    scan = {True: "scan", False: "unrolled", None: "scan n/a"}[self.scan]
    head = (f"{self.step:6s} {self.target} ({self.devices} x {self.device_kind}) "
            f"rules={self.rules} mesh={self.mesh} remat={self.remat} {self.compute_dtype} "
            f"t5={self.t5} {scan} batch={self.batch}")
    times = f"lower {self.lower_s:.0f} s, compile {self.compile_s:.0f} s"
    if self.error is not None:
      return f"{head} | DOES NOT FIT: {self.error} | {self.tflops:.4g} TFLOP/step | {times}"
    hbm = "" if self.hbm_gib is None else f" / {self.hbm_gib:g}"
    fits = {True: " fits", False: " DOES NOT FIT", None: ""}[self.fits]
    per_chip = ("" if self.xla_tflops_per_chip is None
                else f" ({self.xla_tflops_per_chip:.4g} per chip as compiled)")
    return (f"{head} | GiB per chip: args {self.argument_gib:.2f} temp {self.temp_gib:.2f} "
            f"out {self.output_gib:.2f} alias {self.alias_gib:.2f} peak "
            f"{self.peak_gib:.2f}{hbm}{fits} | {self.tflops:.4g} TFLOP/step{per_chip} | {times}")


def _with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def lower_train(model: Any, optimizer: Any, partitioner: AotPartitioner, shape: BatchShape
                ) -> tuple[Any, Any]:
  """(lowered train step, abstract params) for abstract (state, batch, rng)."""
  spec = state_lib.state_spec(model, model.abstract_batch(), optimizer, partitioner)
  step = trainer.make_train_step(model, optimizer, partitioner=partitioner,
                                 state_shardings=spec.shardings)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=partitioner.replicated)
  with partitioner.context():
    lowered = step.lower(spec.abstract, shape.abstract(model, partitioner), rng)
  return lowered, spec.abstract.params


def cache_logical_axes(ndim: int) -> tuple:
  """Logical names of a decoder cache leaf: keys and values are [B*N, S, H, Dh] (with a leading
  'layers' axis when the decoder scans); the write index (a scalar, or one per scanned layer)
  is replicated."""
  names = ("batch", "length", "heads", "kv")
  if ndim < len(names):
    return (None,) * ndim
  return ("layers",) * (ndim - len(names)) + names


def lower_decode(model: Any, partitioner: AotPartitioner, shape: BatchShape) -> tuple[Any, Any]:
  """(lowered decode step, abstract params): one cached step for all B * N slots, the cache
  sized for L tokens, on abstract (params, cache, encoded, tokens); the cache is donated.
  The step returns the next token (argmax) and its points, as greedy decoding reads them."""
  module = model.module
  boxed, param_shardings = partitioner.abstract_params(
      state_lib.param_init_fn(model, model.abstract_batch()))
  params = _with_sharding(nn.meta.unbox(boxed), param_shardings)
  batch = shape.abstract(model, partitioner)
  b, n = shape.batch, shape.num_slots

  def encode(p, x):
    return module.apply({"params": p}, x.image, x.image_valid_hw, x.prompt_boxes,
                        x.prompt_index, x.context_tokens, method=PixelLLM.encode)

  def empty_cache(p, encoded):  # flax wmt idiom: full-length tokens only size the cache
    _, variables = module.apply({"params": p}, encoded, jnp.zeros((b, n, shape.length),
                                                                  jnp.int32),
                                decode=True, mutable=["cache"], method=PixelLLM.decode)
    return variables["cache"]

  with partitioner.context():
    encoded = jax.eval_shape(encode, params, batch)
    cache = jax.eval_shape(empty_cache, params, encoded)
  by_batch = partitioner.batch_sharding()
  encoded = _with_sharding(encoded, jax.tree.map(lambda _: by_batch, encoded))
  cache_shardings = jax.tree.map(
      lambda x: partitioner.logical_sharding(P(*cache_logical_axes(x.ndim))), cache)
  cache = _with_sharding(cache, cache_shardings)
  tokens = jax.ShapeDtypeStruct((b, n, 1), jnp.int32, sharding=by_batch)

  def decode_step(p, cache, encoded, tokens_BxNx1):
    out, variables = module.apply({"params": p, "cache": cache}, encoded, tokens_BxNx1,
                                  decode=True, mutable=["cache"], method=PixelLLM.decode)
    next_token = jnp.argmax(out.logits[:, :, 0], axis=-1).astype(jnp.int32)
    return next_token, out.points[:, :, 0], variables["cache"]

  # keep_unused: the image towers' parameters, which a decoding step does not read, stay
  # arguments, so the memory is what an evaluation holds (every parameter and the cache).
  jitted = partitioner.jit(decode_step,
                           in_shardings=(param_shardings, cache_shardings, by_batch, by_batch),
                           out_shardings=(by_batch, by_batch, cache_shardings), donate_argnums=1,
                           keep_unused=True)
  with partitioner.context():
    lowered = jitted.lower(params, cache, encoded, tokens)
  return lowered, params


def tflops(stage: Any) -> float | None:
  """XLA's FLOP count (in TFLOP) of a lowered (whole program) or compiled (per chip) step;
  None where the compiler gives none (a deviceless GPU compile)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: a list of dicts
  return None if cost is None else float(cost.get("flops", 0.0)) / 1e12


def analyse(compiled: Any) -> dict[str, float]:
  """Per-chip memory (GiB) and FLOPs (TFLOP) of a compiled step, as XLA reports them."""
  memory = compiled.memory_analysis()
  gib = {name: getattr(memory, f"{name}_size_in_bytes") / GIB
         for name in ("argument", "output", "alias", "temp")}
  peak = gib["argument"] + gib["output"] - gib["alias"] + gib["temp"]
  return {**{f"{k}_gib": v for k, v in gib.items()}, "peak_gib": peak,
          "xla_tflops_per_chip": tflops(compiled)}


def compile_or_oom(lowered: Any, compiler_options: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], str | None]:
  """(analyse(compiled), None), or (every figure None, the message) when the TPU compiler
  refuses the step because it needs more memory than a chip has (RESOURCE_EXHAUSTED)."""
  try:
    return analyse(lowered.compile(compiler_options)), None
  except Exception as e:  # pylint: disable=broad-except  (jax's JaxRuntimeError)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = str(e).strip().splitlines()[0]
    names = ("argument_gib", "output_gib", "alias_gib", "temp_gib", "peak_gib",
             "xla_tflops_per_chip")
    return dict.fromkeys(names), message


def _count(tree: Any, keep=lambda path: True) -> int:
  return sum(x.size for kp, x in jax.tree_util.tree_leaves_with_path(tree) if keep(path_of(kp)))


def check(model: Any, optimizer: Any, shape: BatchShape, *, devices: Sequence[Any],
          mesh_shape: Sequence[int], rules: Any, rules_label: str | None = None,
          steps: Sequence[str] = STEPS,
          target: str = "cpu", hbm_gib: float | None = None, t5: str = "",
          scan: bool | None = None, unrolled: tuple[Any, Any] | None = None,
          compiler_options: dict[str, Any] | None = None) -> Iterator[Report]:
  """Compiles each of `steps` on a (data, fsdp, model) mesh over `devices` and reports it
  (one at a time, so a caller can print each report as it comes).

  Args:
    model: a PixelLLMModel; optimizer: the train step's, freezing included.
    rules: a rule set name or table (partitioning.rules_of); rules_label: its name in the
      report (default: the set's name, or 'custom').
    hbm_gib: memory per chip to compare with (default: memory_gib of the devices' kind).
    t5, scan: labels for the report.
    unrolled: (model, optimizer) equal to the given ones but without scan, to count the
      FLOPs with (XLA counts a loop's body once); None: the given model does not scan.
    compiler_options: XLA options for compiling the steps (e.g. gpu_targets.COMPILER_OPTIONS).

  The step's FLOPs are XLA's count of the unrolled step lowered for one CPU device (the
  whole step before partitioning and optimization: cheap, and XLA gives no count of a
  lowering for a TPU topology); the per-chip count of the compiled step is reported beside.
  """
  unknown = sorted(set(steps) - set(STEPS))
  if unknown:
    raise ValueError(f"unknown steps {unknown}: choose from {STEPS}")
  partitioner = AotPartitioner(mesh_shape, rules, devices=devices)
  partitioner.check_batch_size(shape.batch, "scale_check")
  kind = partitioner.mesh.devices.flat[0].device_kind
  if hbm_gib is None:
    hbm_gib = memory_gib(kind)
  n = partitioner.mesh.devices.size

  one_device = AotPartitioner((1, 1, 1), rules, devices=jax.devices("cpu")[:1])

  def lower(step, model, optimizer, partitioner):
    if step == "train":
      return lower_train(model, optimizer, partitioner, shape)
    return lower_decode(model, partitioner, shape)

  for step in steps:
    start = time.perf_counter()
    lowered, params = lower(step, model, optimizer, partitioner)
    lowered_at = time.perf_counter()
    stats, error = compile_or_oom(lowered, compiler_options)
    compiled_at = time.perf_counter()
    step_tflops = tflops(lower(step, *(unrolled or (model, optimizer)), one_device)[0])
    yield Report(
        step=step, target=target, devices=n, device_kind=kind, hbm_gib=hbm_gib,
        rules=rules_label or partitioner.rule_set,
        mesh="x".join(str(s) for s in partitioner.mesh.shape.values()),
        remat=model.config.t5.remat, compute_dtype=model.dtype.compute_dtype, t5=t5, scan=scan,
        batch=str(shape), params_b=_count(params) / 1e9,
        trainable_b=_count(params, model.trainable) / 1e9, **stats,
        fits=(False if error else None if hbm_gib is None else stats["peak_gib"] <= hbm_gib),
        tflops=step_tflops, lower_s=lowered_at - start, compile_s=compiled_at - lowered_at,
        error=error)
