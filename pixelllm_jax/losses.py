"""Training losses (docs/DESIGN.md, "Tasks").

- Caption cross entropy with GRiT-style label smoothing: target probability
  1 - eps on the true token and eps / (V - 1) on every other id, over tokens
  with non-zero `decoder_loss_weights` (pad targets carry weight 0).
- Localization L1: mean over the P points and xy of |pred - target| for tokens
  with non-zero `point_weights`. Coordinates are normalized to [0, 1]; the
  official code used pixels on a 384 canvas with weight 0.1, which is weight
  38.4 here (the default).

Averaging. The official batches hold one task each, so each loss is a mean over
that task's tokens. Our batches mix tasks by default (one jitted shape for every
task), so with `per_task_mean` (default) each loss is the mean over the tasks
present in the batch of that task's token mean: a trace narrative's 25
supervised tokens then weigh as much as a referring expression's single box
token, as they do under the official per-task batches. With
`per_task_mean=False` the loss is the plain mean over all weighted tokens. With
homogeneous batches (`train_data.homogeneous`) both are the official per-task mean.

Optional box term (`box_giou_weight`, default 0 = the official L1 only): with
P = 2 points per token, the two points of each point-supervised token of the
`box_giou_tasks` (default: every task whose slots supervise points) are a box
(min/max of the points, as at inference) and its target points the true box;
the term is the mean generalized IoU loss (1 - GIoU, Rezatofighi et al. 2019,
as DETR adds to its box L1). L1 alone pulls each corner by a constant step
whatever the box size; GIoU weighs errors relative to the box.

Metrics carry `batch.COUNT_PREFIX + name` token counts for every averaged
metric, so logging windows over batches of different tasks average correctly.

Micro-batches (gradient accumulation). Every average above is a sum over
tokens divided by a token count, and the counts (`Normalizers`) depend on the
batch's weights and task ids only, never on the parameters. Given the
normalizers of a whole batch, `compute_losses` of one part of it returns that
part's additive share: its token sums over the *whole* batch's counts (tasks
present anywhere in the batch count as present). Summed over the parts, the
loss, its gradient and every metric equal the whole batch's; averaging the
parts' own means would not (parts with fewer tokens would weigh as much).
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from pixelllm_jax import tasks
from pixelllm_jax.batch import COUNT_PREFIX, Batch, Output


@dataclasses.dataclass(frozen=True)
class LossConfig:
  label_smoothing: float = 0.1
  point_loss_weight: float = 38.4
  text_loss_weight: float = 1.0
  per_task_mean: bool = True
  box_giou_weight: float = 0.0
  box_giou_tasks: tuple[str, ...] | None = None  # None: every task with `point_loss`

  def __post_init__(self):
    if self.box_giou_tasks is None:
      object.__setattr__(self, "box_giou_tasks", POINT_TASKS)
    object.__setattr__(self, "box_giou_tasks", tuple(self.box_giou_tasks))
    tasks.check_names(self.box_giou_tasks, "LossConfig.box_giou_tasks")


# Tasks whose slots supervise the localization head.
POINT_TASKS = tuple(name for name in tasks.TASKS if tasks.get(name).point_loss)


def smoothed_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float
) -> jax.Array:
  """float32[..., V], int32[...] -> float32[...] per-token loss."""
  vocab = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  true_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing == 0.0:
    return -true_logp
  off = label_smoothing / (vocab - 1)
  on = 1.0 - label_smoothing
  return -(on * true_logp + off * (jnp.sum(logp, axis=-1) - true_logp))


def giou_loss(pred_P2: jax.Array, target_P2: jax.Array) -> jax.Array:
  """float32[..., 2, 2] point pairs -> float32[...] 1 - GIoU of their min/max boxes."""
  def box(points):
    return jnp.min(points, axis=-2), jnp.max(points, axis=-2)

  def area(lo, hi):
    return jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)

  (p_lo, p_hi), (t_lo, t_hi) = box(pred_P2), box(target_P2)
  inter = area(jnp.maximum(p_lo, t_lo), jnp.minimum(p_hi, t_hi))
  union = area(p_lo, p_hi) + area(t_lo, t_hi) - inter
  hull = area(jnp.minimum(p_lo, t_lo), jnp.maximum(p_hi, t_hi))
  eps = 1e-7
  iou = inter / (union + eps)
  return 1.0 - (iou - (hull - union) / (hull + eps))


def _group_counts(weights_BxNxL: jax.Array, task_ids_BxN: jax.Array) -> jax.Array:
  """float32[T + 1]: summed weights of each task's slots (tasks.TASKS order), then of all slots."""
  counts = [jnp.sum(weights_BxNxL * (task_ids_BxN == i)[..., None])
            for i in range(len(tasks.TASKS))]
  return jnp.stack(counts + [jnp.sum(weights_BxNxL)])


def _group_sums(values_BxNxL: jax.Array, weights_BxNxL: jax.Array,
                task_ids_BxN: jax.Array) -> jax.Array:
  """float32[T + 1]: weighted sums of `values` per task, then over all slots."""
  sums = [jnp.sum(values_BxNxL * (weights_BxNxL * (task_ids_BxN == i)[..., None]))
          for i in range(len(tasks.TASKS))]
  return jnp.stack(sums + [jnp.sum(values_BxNxL * weights_BxNxL)])


def _mean(sums_G: jax.Array, counts_G: jax.Array, per_task: bool) -> jax.Array:
  """The loss average from `_group_sums` / `_group_counts` rows: the plain weighted mean
  (last row), or the mean over present tasks of each task's mean. Linear in `sums`."""
  if not per_task:
    return sums_G[-1] / jnp.maximum(counts_G[-1], 1.0)
  means = sums_G[:-1] / jnp.maximum(counts_G[:-1], 1.0)
  present = (counts_G[:-1] > 0).astype(jnp.float32)
  return jnp.sum(means * present) / jnp.maximum(jnp.sum(present), 1.0)


@flax.struct.dataclass
class Normalizers:
  """The token counts the loss averages divide by, float32[T + 1] each (per task in
  `tasks.TASKS` order, then all tasks): functions of the batch's weights and task ids only.

  text: caption weights. point: point weights. giou: point weights of `box_giou_tasks` slots.
  """
  text: jax.Array
  point: jax.Array
  giou: jax.Array


def _giou_weights(batch: Batch, config: LossConfig) -> jax.Array:
  ids = jnp.asarray([tasks.TASK_ID[t] for t in config.box_giou_tasks])
  in_tasks = jnp.isin(batch.task_ids, ids)
  return batch.point_weights.astype(jnp.float32) * in_tasks[..., None]


def normalizers(batch: Batch, config: LossConfig = LossConfig()) -> Normalizers:
  """The counts of `batch` (no model output needed; cheap)."""
  return Normalizers(
      text=_group_counts(batch.decoder_loss_weights.astype(jnp.float32), batch.task_ids),
      point=_group_counts(batch.point_weights.astype(jnp.float32), batch.task_ids),
      giou=_group_counts(_giou_weights(batch, config), batch.task_ids))


def compute_losses(
    output: Output, batch: Batch, config: LossConfig = LossConfig(),
    whole: Normalizers | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (total loss, metrics). Metrics are scalars safe to average.

  whole: the `normalizers` of a larger batch that `batch` is a part of (module
  docstring, "Micro-batches"); the loss and every metric (counts included) are then
  this part's additive share of the whole batch's. None: `batch` is the whole batch.
  """
  own = normalizers(batch, config)
  whole = own if whole is None else whole
  per_task = config.per_task_mean
  text_w = batch.decoder_loss_weights.astype(jnp.float32)
  ce = smoothed_cross_entropy(output.logits, batch.decoder_target_tokens, config.label_smoothing)
  text_loss = _mean(_group_sums(ce, text_w, batch.task_ids), whole.text, per_task)

  point_w = batch.point_weights.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(output.points - batch.point_targets), axis=(-1, -2))
  l1_sums = _group_sums(l1, point_w, batch.task_ids)
  point_loss = _mean(l1_sums, whole.point, per_task)

  total = config.text_loss_weight * text_loss + config.point_loss_weight * point_loss
  box_metrics = {}
  if config.box_giou_weight:
    if output.points.shape[-2] != 2:
      raise ValueError("LossConfig.box_giou_weight needs 2 points per token (box corners), "
                       f"got {output.points.shape[-2]}")
    giou_sums = _group_sums(giou_loss(output.points, batch.point_targets),
                            _giou_weights(batch, config), batch.task_ids)
    giou = _mean(giou_sums, whole.giou, per_task)
    total = total + config.box_giou_weight * giou
    box_metrics = {"giou_loss": giou, COUNT_PREFIX + "giou_loss": own.giou[-1]}
  correct = (jnp.argmax(output.logits, axis=-1) == batch.decoder_target_tokens)
  metrics = {
      "loss": total,
      "text_loss": text_loss,
      "point_loss": point_loss,
      "token_accuracy": jnp.sum(correct * text_w) / jnp.maximum(whole.text[-1], 1.0),
      COUNT_PREFIX + "text_loss": own.text[-1],
      COUNT_PREFIX + "token_accuracy": own.text[-1],
      COUNT_PREFIX + "point_loss": own.point[-1],
      **box_metrics,
  }
  for i, name in enumerate(tasks.TASKS):
    metrics[f"slots/{name}"] = jnp.sum(batch.task_ids == i).astype(jnp.float32)
    if name in POINT_TASKS:
      metrics[f"point_l1/{name}"] = l1_sums[i] / jnp.maximum(whole.point[i], 1.0)
      metrics[f"{COUNT_PREFIX}point_l1/{name}"] = own.point[i]
  return total, metrics
