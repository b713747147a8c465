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

Mask loss (referring segmentation, batches with `mask_targets`), as the
official refseg loss: the mask head's low-res logits are upsampled bilinearly to
the canvas and only the image's pixels count (not the padding); per slot
`mask_focal_weight` (20) x sigmoid focal loss (alpha 0.5, gamma 2; the mean
over the image's pixels) + `mask_dice_weight` (1) x dice loss + `mask_iou_weight`
(1) x the squared error of the predicted IoU against the IoU of the
thresholded mask (logit > 0) with the target (a constant); averaged over the
slots of mask tasks (`Task.mask_loss`) like the other losses (per task or
plain), times `mask_loss_weight`. The official focal normalization is not
recorded; this is the per-mask pixel mean.

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
from typing import Any

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
  mask_loss_weight: float = 1.0
  mask_focal_weight: float = 20.0
  mask_dice_weight: float = 1.0
  mask_iou_weight: float = 1.0
  mask_focal_alpha: float = 0.5
  mask_focal_gamma: float = 2.0
  det_loss_weight: float = 1.0

  def __post_init__(self):
    if self.box_giou_tasks is None:
      object.__setattr__(self, "box_giou_tasks", POINT_TASKS)
    object.__setattr__(self, "box_giou_tasks", tuple(self.box_giou_tasks))
    tasks.check_names(self.box_giou_tasks, "LossConfig.box_giou_tasks")


# Tasks whose slots supervise the localization head, and the mask head.
POINT_TASKS = tuple(name for name in tasks.TASKS if tasks.get(name).point_loss)
MASK_TASKS = tuple(name for name in tasks.TASKS if tasks.get(name).mask_loss)


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


def image_pixels(valid_hw_Bx2: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """bool[B, H, W]: the canvas pixels that hold the image (top-left `valid_hw` part)."""
  h, w = hw
  rows = jnp.arange(h)[None] + 0.5 < valid_hw_Bx2[:, 0:1].astype(jnp.float32) * h
  cols = jnp.arange(w)[None] + 0.5 < valid_hw_Bx2[:, 1:2].astype(jnp.float32) * w
  return rows[:, :, None] & cols[:, None, :]


def mask_terms(logits_BNhw: jax.Array, iou_pred_BN: jax.Array, targets_BNHW: jax.Array,
               valid_hw_Bx2: jax.Array, alpha: float = 0.5, gamma: float = 2.0
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-slot mask losses (focal, dice, IoU squared error), each float32[B, N].

  The logits are upsampled bilinearly to the targets' canvas H x W; only the image's pixels
  (`image_pixels`) count. focal: the mean over them of alpha_t (1 - p_t)^gamma CE;
  dice: 1 - (2 sum p t + 1) / (sum p + sum t + 1), p = sigmoid(logit); IoU error:
  (iou_pred - IoU(logit > 0, target))^2, the IoU held constant.
  """
  b, n, h, w = targets_BNHW.shape
  x = jax.image.resize(logits_BNhw.astype(jnp.float32), (b, n, h, w), "bilinear")
  valid = image_pixels(valid_hw_Bx2, (h, w))[:, None].astype(jnp.float32)  # [B, 1, H, W]
  t = targets_BNHW.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  ce = jax.nn.softplus(x) - x * t                  # -log(p) if t else -log(1 - p)
  p_t = p * t + (1.0 - p) * (1.0 - t)
  alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
  total = lambda v: jnp.sum(v * valid, axis=(-2, -1))  # noqa: E731  (over the image)
  focal = total(alpha_t * ce * (1.0 - p_t) ** gamma) / jnp.maximum(total(1.0), 1.0)
  dice = 1.0 - (2.0 * total(p * t) + 1.0) / (total(p) + total(t) + 1.0)
  pred = (x > 0).astype(jnp.float32)
  inter, union = total(pred * t), total(jnp.maximum(pred, t))
  iou = jax.lax.stop_gradient(inter / jnp.maximum(union, 1.0))
  return focal, dice, (iou_pred_BN.astype(jnp.float32) - iou) ** 2


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
  mask: slots of mask tasks, in batches that carry mask targets.
  det: the box decoder's denominators (`detection.normalizers`, filled by the model,
    which knows the decoder's config), in batches that carry detection targets; else None.
  """
  text: jax.Array
  point: jax.Array
  giou: jax.Array
  mask: jax.Array
  det: Any = None


def _slots_of(task_ids_BxN: jax.Array, names: tuple[str, ...]) -> jax.Array:
  """bool[B, N]: the slots whose task is one of `names`."""
  return jnp.isin(task_ids_BxN, jnp.asarray([tasks.TASK_ID[t] for t in names]))


def _giou_weights(batch: Batch, config: LossConfig) -> jax.Array:
  in_tasks = _slots_of(batch.task_ids, config.box_giou_tasks)
  return batch.point_weights.astype(jnp.float32) * in_tasks[..., None]


def _mask_weights(batch: Batch) -> jax.Array:
  """float32[B, N, 1]: 1 for the slots of mask tasks when the batch carries mask targets."""
  if batch.mask_targets is None or not MASK_TASKS:
    return jnp.zeros((*batch.task_ids.shape, 1), jnp.float32)
  return _slots_of(batch.task_ids, MASK_TASKS).astype(jnp.float32)[..., None]


def normalizers(batch: Batch, config: LossConfig = LossConfig()) -> Normalizers:
  """The counts of `batch` (no model output needed; cheap)."""
  return Normalizers(
      text=_group_counts(batch.decoder_loss_weights.astype(jnp.float32), batch.task_ids),
      point=_group_counts(batch.point_weights.astype(jnp.float32), batch.task_ids),
      giou=_group_counts(_giou_weights(batch, config), batch.task_ids),
      mask=_group_counts(_mask_weights(batch), batch.task_ids))


def _mask_loss(output: Output, batch: Batch, config: LossConfig, own: Normalizers,
               whole: Normalizers) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mask loss, its metrics); zeros with zero counts for a batch without mask targets,
  so every step logs the same metric names."""
  names = ("mask_loss", "mask_focal", "mask_dice", "mask_iou_error")
  if batch.mask_targets is None:
    zero = jnp.zeros((), jnp.float32)
    return zero, {k: v for name in names for k, v in ((name, zero), (COUNT_PREFIX + name, zero))}
  if output.mask_logits is None:
    raise ValueError("the batch has mask targets but the model gave no masks "
                     "(PixelLLMConfig.mask_head)")
  focal, dice, iou_error = mask_terms(output.mask_logits, output.mask_iou, batch.mask_targets,
                                      batch.image_valid_hw, config.mask_focal_alpha,
                                      config.mask_focal_gamma)
  per_slot = (config.mask_focal_weight * focal + config.mask_dice_weight * dice
              + config.mask_iou_weight * iou_error)
  weights = _mask_weights(batch)
  loss = _mean(_group_sums(per_slot[..., None], weights, batch.task_ids), whole.mask,
               config.per_task_mean)
  metrics = {"mask_loss": loss}
  for name, values in (("mask_focal", focal), ("mask_dice", dice), ("mask_iou_error", iou_error)):
    metrics[name] = jnp.sum(values[..., None] * weights) / jnp.maximum(whole.mask[-1], 1.0)
  metrics.update({COUNT_PREFIX + name: own.mask[-1] for name in names})
  return loss, metrics


DET_TERMS = ("det_loss", "det_heatmap", "det_regression", "det_roi_cls", "det_roi_reg")


def _det_loss(output: Output, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the box decoder's loss, its terms); zeros with zero counts for a batch without
  detection targets. The terms come divided by the whole batch's normalizers; their count
  is this part's images that have a ground-truth box."""
  zero = jnp.zeros((), jnp.float32)
  if batch.det_boxes is None:
    return zero, {k: zero for name in DET_TERMS for k in (name, COUNT_PREFIX + name)}
  if output.det_losses is None:
    raise ValueError("the batch has detection targets but the model gave no detection "
                     "losses (PixelLLMConfig.box_head)")
  images = jnp.sum(jnp.any(batch.det_valid, axis=-1)).astype(jnp.float32)
  metrics = {name: output.det_losses[name].astype(jnp.float32) for name in DET_TERMS}
  metrics.update({COUNT_PREFIX + name: images for name in DET_TERMS})
  return metrics["det_loss"], metrics


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
  mask_loss, mask_metrics = _mask_loss(output, batch, config, own, whole)
  total = total + config.mask_loss_weight * mask_loss
  det_loss, det_metrics = _det_loss(output, batch)
  total = total + config.det_loss_weight * det_loss
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
      **mask_metrics,
      **det_metrics,
  }
  for i, name in enumerate(tasks.TASKS):
    metrics[f"slots/{name}"] = jnp.sum(batch.task_ids == i).astype(jnp.float32)
    if name in POINT_TASKS:
      metrics[f"point_l1/{name}"] = l1_sums[i] / jnp.maximum(whole.point[i], 1.0)
      metrics[f"{COUNT_PREFIX}point_l1/{name}"] = own.point[i]
  return total, metrics
