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
"""
import dataclasses

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


def _weighted_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  count = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(count, 1.0), count


def _task_mean(values_BxNxL: jax.Array, weights_BxNxL: jax.Array, task_ids_BxN: jax.Array,
               per_task: bool) -> tuple[jax.Array, jax.Array]:
  """(mean, token count): plain weighted mean, or the mean over present tasks of each task's mean."""
  if not per_task:
    return _weighted_mean(values_BxNxL, weights_BxNxL)
  means, present = [], []
  for i in range(len(tasks.TASKS)):
    w = weights_BxNxL * (task_ids_BxN == i)[..., None]
    mean, count = _weighted_mean(values_BxNxL, w)
    means.append(mean)
    present.append((count > 0).astype(jnp.float32))
  present = jnp.stack(present)
  total = jnp.sum(jnp.stack(means) * present) / jnp.maximum(jnp.sum(present), 1.0)
  return total, jnp.sum(weights_BxNxL)


def compute_losses(
    output: Output, batch: Batch, config: LossConfig = LossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (total loss, metrics). Metrics are scalars safe to average."""
  text_w = batch.decoder_loss_weights.astype(jnp.float32)
  ce = smoothed_cross_entropy(output.logits, batch.decoder_target_tokens, config.label_smoothing)
  text_loss, text_count = _task_mean(ce, text_w, batch.task_ids, config.per_task_mean)

  point_w = batch.point_weights.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(output.points - batch.point_targets), axis=(-1, -2))
  point_loss, point_count = _task_mean(l1, point_w, batch.task_ids, config.per_task_mean)

  total = config.text_loss_weight * text_loss + config.point_loss_weight * point_loss
  box_metrics = {}
  if config.box_giou_weight:
    if output.points.shape[-2] != 2:
      raise ValueError("LossConfig.box_giou_weight needs 2 points per token (box corners), "
                       f"got {output.points.shape[-2]}")
    in_tasks = jnp.isin(batch.task_ids,
                        jnp.asarray([tasks.TASK_ID[t] for t in config.box_giou_tasks]))
    giou, giou_count = _task_mean(giou_loss(output.points, batch.point_targets),
                                  point_w * in_tasks[..., None], batch.task_ids,
                                  config.per_task_mean)
    total = total + config.box_giou_weight * giou
    box_metrics = {"giou_loss": giou, COUNT_PREFIX + "giou_loss": giou_count}
  correct = (jnp.argmax(output.logits, axis=-1) == batch.decoder_target_tokens)
  metrics = {
      "loss": total,
      "text_loss": text_loss,
      "point_loss": point_loss,
      "token_accuracy": _weighted_mean(correct, text_w)[0],
      COUNT_PREFIX + "text_loss": text_count,
      COUNT_PREFIX + "token_accuracy": text_count,
      COUNT_PREFIX + "point_loss": point_count,
      **box_metrics,
  }
  for i, name in enumerate(tasks.TASKS):
    in_task = (batch.task_ids == i)[..., None]
    metrics[f"slots/{name}"] = jnp.sum(batch.task_ids == i).astype(jnp.float32)
    if name in POINT_TASKS:
      metrics[f"point_l1/{name}"], metrics[f"{COUNT_PREFIX}point_l1/{name}"] = _weighted_mean(
          l1, point_w * in_task)
  return total, metrics
