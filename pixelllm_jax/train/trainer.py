"""The train step and the training loop (generic over the model API).

- `make_train_step`: one pure step `(state, batch, rng) -> (state, metrics)`,
  jitted once by the partitioner with explicit shardings (state: its own;
  every batch leaf: leading axis over the batch axes; rng and metrics:
  replicated) and the state donated (nanodo / big_vision). The dropout key is
  `fold_in(rng, state.step)`, so a run is a function of (seed, data) and a
  resumed run draws the same keys as an uninterrupted one.
- Gradient accumulation (`num_microbatches` k > 1): the global batch is split
  along its batch axis into k micro-batches, micro-batch m holding rows m,
  m + k, m + 2k, ... (each device's rows split in place: no data moves), and
  `jax.lax.scan` sums their gradients, so activations are those of one
  micro-batch. Each adds its share of the whole batch's loss
  (`model.loss_share` over `model.loss_normalizers` of the global batch: token
  sums over the whole batch's token counts), so loss, metrics and gradient
  equal one step on the whole batch up to float rounding. Only trainable leaves
  are differentiated and accumulated (float32). Micro-batch m's dropout key is
  `fold_in(fold_in(rng, step), m)`; k = 1 keeps `fold_in(rng, step)`, so with
  dropout on, runs with different k draw different masks. The global batch
  must be a multiple of k times the batch shards.
- A step whose loss or any gradient is not finite keeps the previous
  parameters and optimizer state (the step counter still advances: the batch
  is consumed) and reports `nonfinite` = 1; `train` stops the run after
  `max_nonfinite_steps` such steps in a row (`guards.NonFiniteGuard`).
- `train`: builds the state born sharded, resumes from the latest checkpoint in
  `model_dir` (train state *and* iterator state), logs a console line,
  TensorBoard scalars and a line of `model_dir/train/metrics.jsonl` every
  `log_every` steps, checkpoints every `checkpoint_every` steps and at the
  end. It holds `model_dir` for itself (`guards.ModelDirLock`), saves and
  returns on SIGTERM (`TrainResult.preempted`), and stops at once when an
  asynchronous save fails (`guards.SaveMonitor`).

Contracts:
  model: a `model.BaseModel`; `model.loss(params, batch, rng) -> (float32[] loss,
    {name: float32[]})`. A metric `name` with a companion `batch.COUNT_PREFIX +
    name` (its token count) is averaged over a logging window weighted by that
    count (left out of a window where the count is 0); other metrics are
    averaged per step. `model.trainable(path)` decides what trains. Accumulation
    (k > 1) also needs `model.loss_normalizers` and `model.loss_share`.
  optimizer: the transformation of the trainable leaves (`optim.make_optimizer`);
    the loop adds the freezing (`optim.with_frozen`).
  train_data: iterator of Batch (or dicts of Batch fields) of numpy arrays, the
    per-process share of the global batch, with `get_state()` (JSON-able) and
    `set_state(state)`.
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pixelllm_jax.batch import COUNT_PREFIX, Batch
from pixelllm_jax.model import BaseModel
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import checkpoint as ckpt
from pixelllm_jax.train import guards, metrics_writer, optim
from pixelllm_jax.train import run_record as run_record_lib
from pixelllm_jax.train import state as state_lib
from pixelllm_jax.tree_paths import path_of

TrainStep = Callable[[state_lib.TrainState, Batch, jax.Array],
                     tuple[state_lib.TrainState, dict[str, jax.Array]]]


def as_batch(example: Batch | Mapping[str, Any]) -> Batch:
  return example if isinstance(example, Batch) else Batch(**example)


def all_finite(tree: Any) -> jax.Array:
  """bool[]: every floating leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_microbatches(global_batch_size: int, num_microbatches: int,
                       partitioner: Partitioner) -> None:
  """Raises unless the global batch splits into `num_microbatches` micro-batches that
  each split evenly over the partitioner's batch shards."""
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  need = num_microbatches * partitioner.batch_shards
  if global_batch_size % need:
    raise ValueError(
        f"a global batch of {global_batch_size} does not split into {num_microbatches} "
        f"micro-batches over the {partitioner.batch_shards} batch shards of mesh "
        f"{dict(partitioner.mesh.shape)}: give a global batch that is a multiple of "
        f"num_microbatches x batch shards = {need}, or change num_microbatches")


def split_microbatches(batch: Batch, num_microbatches: int, partitioner: Partitioner) -> Batch:
  """Leaves [B, ...] -> [k, B / k, ...]; micro-batch m holds rows m, m + k, m + 2k, ...

  Strided, not contiguous: each device holds a contiguous block of B / shards rows
  and gives every micro-batch B / (k * shards) of them, so the split moves no data
  and every device works on every micro-batch (a contiguous split would put a
  micro-batch on a k-th of the devices).
  """
  k = num_microbatches
  sharding = NamedSharding(partitioner.mesh, P(None, partitioner.batch_axes))

  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding)

  return jax.tree.map(split, batch)


def accumulate_gradients(model: BaseModel, params: Any, batch: Batch, rng: jax.Array,
                         num_microbatches: int, partitioner: Partitioner,
                         param_shardings: Any) -> tuple[jax.Array, dict, Any]:
  """(loss, metrics, grads) of `batch` summed over micro-batch shares (module docstring).

  Frozen leaves (`model.trainable`) get zero gradients without being differentiated,
  so the accumulator holds the trainable gradients only. `rng` is the step's key.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in path_leaves]
  trains = [model.trainable(path_of(kp)) for kp, _ in path_leaves]
  shardings = jax.tree.leaves(param_shardings)
  assert len(shardings) == len(leaves), "param_shardings must mirror params"
  trained = [x for x, t in zip(leaves, trains) if t]
  trained_shardings = [s for s, t in zip(shardings, trains) if t]
  normalizers = model.loss_normalizers(batch)  # of the whole batch: the shares' denominators

  def share(trained, micro, rng):
    it = iter(trained)
    full = jax.tree.unflatten(treedef, [next(it) if t else x for x, t in zip(leaves, trains)])
    return model.loss_share(full, micro, rng, normalizers)

  grad_fn = jax.value_and_grad(share, has_aux=True)
  micro = split_microbatches(batch, num_microbatches, partitioner)

  def constrain(grads):
    return [jax.lax.with_sharding_constraint(g, s) for g, s in zip(grads, trained_shardings)]

  def body(carry, xs):
    index, micro_batch = xs
    (loss, metrics), grads = grad_fn(trained, micro_batch, jax.random.fold_in(rng, index))
    (loss_sum, metric_sums), grad_sums = carry
    return ((loss_sum + loss, jax.tree.map(jnp.add, metric_sums, metrics)),
            constrain([a + g for a, g in zip(grad_sums, grads)])), None

  shapes = jax.eval_shape(grad_fn, trained, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)
  ((loss, metrics), grad_sums), _ = jax.lax.scan(
      body, (zeros[0], constrain(zeros[1])), (jnp.arange(num_microbatches), micro))
  it = iter(grad_sums)
  grads = jax.tree.unflatten(treedef, [next(it).astype(x.dtype) if t else jnp.zeros_like(x)
                                       for x, t in zip(leaves, trains)])
  return loss, metrics, grads


def make_train_step(model: BaseModel, optimizer: optax.GradientTransformation, *,
                    partitioner: Partitioner,
                    state_shardings: state_lib.TrainState,
                    num_microbatches: int = 1) -> TrainStep:
  """The jitted, donated train step.

  The returned callable takes (state, batch, rng) where batch is a Batch of
  global arrays (`partitioner.shard_batch`) and rng the run's train key; it
  returns the new state and `{'loss': ..., **loss_metrics}` as replicated scalars.
  `optimizer` is used as given (freezing included). `num_microbatches` > 1
  accumulates gradients over that many micro-batches (module docstring); the
  model must implement `loss_normalizers` and `loss_share`.
  """
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  if num_microbatches > 1 and type(model).loss_share is BaseModel.loss_share:
    raise ValueError(f"num_microbatches={num_microbatches} needs a model that splits its loss "
                     f"into micro-batch shares; {type(model).__name__} does not implement "
                     "loss_normalizers / loss_share")

  def step(state: state_lib.TrainState, batch: Batch, rng: jax.Array):
    dropout_rng = jax.random.fold_in(rng, state.step)
    if num_microbatches == 1:
      (loss, metrics), grads = jax.value_and_grad(
          lambda params: model.loss(params, batch, dropout_rng), has_aux=True)(state.params)
    else:
      check_microbatches(batch.image.shape[0], num_microbatches, partitioner)  # at trace time
      loss, metrics, grads = accumulate_gradients(
          model, state.params, batch, dropout_rng, num_microbatches, partitioner,
          state_shardings.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    # Checked on the updates, not the gradients: frozen leaves get zero updates, so their
    # gradients stay dead code (checking them would make XLA compute the frozen towers'
    # backward pass) and cannot stop a run. A non-finite trainable gradient makes its update
    # non-finite (Adam's moments, the global-norm clip).
    finite = jnp.isfinite(loss) & all_finite(updates)
    params = optax.apply_updates(state.params, updates)
    # One conditional picks the whole new or old (params, opt_state). A `jnp.where` per leaf
    # computes the same, but XLA's CPU compiler took superlinear time in the number of such
    # selects sharing one predicate: the demo model with the mask head (about 450 parameter
    # leaves, each with two Adam moments) compiled its train step in 452 s, 39 s this way.
    params, opt_state = jax.lax.cond(finite, lambda: (params, opt_state),
                                     lambda: (state.params, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {**metrics, "loss": loss, "nonfinite": 1.0 - finite.astype(jnp.float32)}

  replicated = partitioner.replicated
  return partitioner.jit(
      step,
      in_shardings=(state_shardings, partitioner.batch_sharding(), replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
  )


@dataclasses.dataclass
class TrainResult:
  state: state_lib.TrainState
  metrics: dict[str, float]   # averaged over the last logging window
  train_seconds: float        # wall clock of the loop (compilation and checkpointing included)
  preempted: bool = False     # stopped early on SIGTERM, after saving a checkpoint
  nonfinite_steps: int = 0    # steps whose update was skipped (non-finite loss or gradient)


class _Window:
  """Sums per-step metrics on device (count-weighted where the loss gives a
  count, see the module contracts); fetched to host only when logged."""

  def __init__(self):
    self.sums, self.steps, self.examples, self.start = None, 0, 0, time.perf_counter()

  def add(self, metrics, examples: int):
    metrics = {k: v * metrics[COUNT_PREFIX + k] if COUNT_PREFIX + k in metrics else v
               for k, v in metrics.items()}
    self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
    self.steps += 1
    self.examples += examples

  def close(self) -> dict[str, float]:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    sums = jax.device_get(self.sums)
    out = {}
    for k, v in sums.items():
      count = sums.get(COUNT_PREFIX + k)
      if count is None:
        out[k] = float(v) / self.steps
      elif count > 0:
        out[k] = float(v) / float(count)
    out["steps_per_second"] = self.steps / seconds
    out["examples_per_second"] = self.examples / seconds
    return out


def _peek(train_data) -> Batch:
  """The next batch's shapes, without consuming it."""
  saved = train_data.get_state()
  first = as_batch(next(train_data))
  train_data.set_state(saved)
  return first


def progress_line(step: int, num_steps: int, metrics: Mapping[str, float]) -> str:
  """One console line: step, losses, token accuracy and throughput."""
  parts = [f"step {step}/{num_steps}", f"loss {metrics['loss']:.4f}"]
  for name in ("text_loss", "point_loss", "token_accuracy"):
    if name in metrics:
      parts.append(f"{name} {metrics[name]:.4f}")
  parts.append(f"{metrics['steps_per_second']:.2f} steps/s")
  parts.append(f"{metrics['examples_per_second']:.1f} examples/s")
  return "  ".join(parts)


def write_summary(model_dir: str, step: int, seconds: float, metrics: Mapping[str, float],
                  num_steps: int | None = None) -> None:
  """model_dir/train_summary.json: steps and wall-clock training seconds, summed
  over resumed invocations, the last logged metrics, and whether the run reached
  its `num_steps` (`finished`; false after a preemption)."""
  path = os.path.join(model_dir, "train_summary.json")
  previous: dict = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  last = {k: float(v) for k, v in metrics.items()} or previous.get("last_metrics", {})
  with open(path, "w") as f:  # (a run resumed at its last step logs nothing: keep the last)
    json.dump({"step": step, "num_steps": num_steps,
               "finished": num_steps is not None and step >= num_steps,
               "train_seconds": float(previous.get("train_seconds", 0.0)) + seconds,
               "last_metrics": last}, f, indent=1)


def train(
    *,
    model_dir: str,
    model: BaseModel,
    train_data: Iterator[Batch],
    num_steps: int,
    optimizer: optax.GradientTransformation,
    partitioner: Partitioner | None = None,
    seed: int = 0,
    log_every: int = 50,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    init_checkpoint: str | Sequence[str] | None = None,
    max_nonfinite_steps: int = 10,
    num_microbatches: int = 1,
    run_record: Mapping[str, str] | None = None,
    allow_config_change: bool = False,
    after_first_step: Callable[[str], None] | None = None,
) -> TrainResult:
  """Trains `model` for `num_steps` total steps (resuming if `model_dir` has a checkpoint).

  Args:
    model_dir: checkpoints (model_dir/checkpoints), TensorBoard events and
      metrics.jsonl (model_dir/train) go here.
    partitioner: mesh and rules (default: all devices, rule set 'dp').
    seed: init key `split(key(seed))[0]`, dropout keys from `split(...)[1]`.
    init_checkpoint: a bare params tree (`checkpoint.save_params`, what `convert`
      writes) or a previous run's model dir, loaded over the fresh init; or a
      sequence of them, loaded in order (a later one's leaves win: e.g. SAM's
      converted mask decoder, then the referring run). Ignored when `model_dir`
      already has a checkpoint.
    max_nonfinite_steps: consecutive steps with a non-finite loss or gradient
      (their updates skipped) after which the run stops with `TrainingDiverged`.
    num_microbatches: accumulate each step's gradient over this many micro-batches
      of the global batch (memory of one micro-batch; the same step as the whole
      batch, dropout masks aside: module docstring). The global batch must be a
      multiple of num_microbatches x the partitioner's batch shards.
    run_record: what determines the results (`train/run_record.py`; the command
      line gives it). A fresh run keeps it in model_dir; a resumed run whose
      record differs stops with `RunConfigChanged` unless `allow_config_change`.
    after_first_step: called with `model_dir` once the first step ran (the
      command line writes the operative gin config there).

  Returns:
    TrainResult with the final state, the last window's averaged metrics, the
    loop's wall-clock seconds and whether it stopped early on SIGTERM.
  """
  partitioner = Partitioner() if partitioner is None else partitioner
  with guards.ModelDirLock(model_dir), guards.PreemptionNotice() as preemption:
    return _train(model_dir=model_dir, model=model, train_data=train_data, num_steps=num_steps,
                  optimizer=optimizer, partitioner=partitioner, seed=seed, log_every=log_every,
                  checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                  init_checkpoint=init_checkpoint, after_first_step=after_first_step,
                  nonfinite=guards.NonFiniteGuard(max_nonfinite_steps), preemption=preemption,
                  num_microbatches=num_microbatches,
                  run_record=run_record, allow_config_change=allow_config_change)


def _train(*, model_dir, model, train_data, num_steps, optimizer, partitioner, seed, log_every,
           checkpoint_every, keep_checkpoints, init_checkpoint, after_first_step,
           nonfinite: guards.NonFiniteGuard, preemption: guards.PreemptionNotice,
           num_microbatches: int, run_record, allow_config_change) -> TrainResult:
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  first_batch = _peek(train_data)  # checked before anything is written to model_dir
  model.check_batch(first_batch)
  global_batch_size = first_batch.image.shape[0] * jax.process_count()
  partitioner.check_batch_size(global_batch_size, "training")
  check_microbatches(global_batch_size, num_microbatches, partitioner)
  manager = ckpt.make_manager(os.path.join(model_dir, "checkpoints"),
                              max_to_keep=keep_checkpoints)
  if run_record is not None and manager.latest_step() is not None:
    run_record_lib.check(model_dir, run_record, what="resuming", allow=allow_config_change,
                         write=jax.process_index() == 0)
  elif run_record is not None and jax.process_index() == 0:
    run_record_lib.save(model_dir, run_record)  # a fresh start: this run's record
  optimizer = optim.with_frozen(optimizer, model.trainable)
  spec = state_lib.state_spec(model, first_batch, optimizer, partitioner)
  shardings = spec.shardings
  restored = ckpt.restore(manager, spec.abstract, shardings)  # never initializes first
  if restored is not None:
    state, data_state = restored
    train_data.set_state(data_state)
    print(f"Resumed from {model_dir} at step {int(state.step)}", flush=True)
  else:
    state = spec.init(init_rng)
    paths = [init_checkpoint] if isinstance(init_checkpoint, str) else init_checkpoint or ()
    for path in paths:
      state = state.replace(params=ckpt.load_params(path, state.params, shardings.params))
      print(f"Loaded initial params from {path}", flush=True)

  train_step = make_train_step(model, optimizer, partitioner=partitioner,
                               state_shardings=shardings, num_microbatches=num_microbatches)
  finite_params = partitioner.jit(all_finite, in_shardings=(shardings.params,),
                                  out_shardings=partitioner.replicated)
  saves = guards.SaveMonitor(manager)

  def save(step: int, state) -> None:
    nonfinite.flush()
    if not bool(finite_params(state.params)):  # the guard makes this unreachable; never save it
      raise guards.TrainingDiverged(f"step {step}: the parameters are not finite; not saved")
    saves.check(wait=True)  # the previous save must have succeeded
    ckpt.save(manager, step, state, train_data.get_state())
    saves.started(step)

  train_rng = partitioner.replicate(train_rng)
  writer = metrics_writer.MetricsWriter(os.path.join(model_dir, "train"))
  step = first_step = int(state.step)
  last_saved = step if restored is not None else None
  window, metrics, preempted = _Window(), {}, False
  start = time.perf_counter()
  try:
    while step < num_steps:
      batch = partitioner.shard_batch(as_batch(next(train_data)))
      state, step_metrics = train_step(state, batch, train_rng)
      step += 1
      nonfinite.add(step, step_metrics["nonfinite"])
      saves.check()
      window.add(step_metrics, batch.image.shape[0])
      if step == first_step + 1 and after_first_step is not None and jax.process_index() == 0:
        after_first_step(model_dir)
      preempted = preemption.requested(step)
      if step % log_every == 0 or step == num_steps or preempted:
        metrics = window.close()
        writer.write_scalars(step, metrics)  # events and train/metrics.jsonl
        print(progress_line(step, num_steps, metrics), flush=True)
        window = _Window()
      if step % checkpoint_every == 0 or step == num_steps or preempted:
        save(step, state)
        last_saved = step
      if preempted:
        print(f"Preempted (SIGTERM): checkpoint of step {step} saved in {model_dir}; "
              "run the same command again to resume", flush=True)
        break
    if last_saved != step:
      save(step, state)
    nonfinite.flush()
    saves.check(wait=True)
  except BaseException:
    # The run stops with an error: saves already under way still complete, so the
    # checkpoints written so far stay usable; the first error is the one reported.
    try:
      manager.wait_until_finished()
      manager.close()
    except Exception as close_error:  # pylint: disable=broad-except
      print(f"(while stopping: {type(close_error).__name__}: {close_error})", flush=True)
    writer.close()
    raise
  manager.wait_until_finished()
  writer.close()
  manager.close()
  train_seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    write_summary(model_dir, step, train_seconds, metrics, num_steps)
  return TrainResult(state=state, metrics=metrics, train_seconds=train_seconds,
                     preempted=preempted, nonfinite_steps=nonfinite.total)
