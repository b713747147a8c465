"""The mask loss (losses.mask_terms and its place in compute_losses) on hand-computed cases."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import losses
from pixelllm_jax.batch import Batch, Output
from pixelllm_jax.metrics import segmentation
from pixelllm_jax.tasks import TASK_ID


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def _focal_pixel(x, t, alpha=0.5, gamma=2.0):
  """One pixel's focal loss written out: -alpha_t (1 - p_t)^gamma log p_t."""
  p = _sig(x)
  p_t = p if t else 1.0 - p
  alpha_t = alpha if t else 1.0 - alpha
  return -alpha_t * (1.0 - p_t) ** gamma * math.log(p_t)


# One 2 x 2 mask at the canvas resolution (no upsampling): logits and target.
LOGITS = [[2.0, -1.0], [0.0, 1.0]]
TARGET = [[1, 0], [1, 0]]


def _terms(valid_hw, iou_pred=0.5, logits=LOGITS, target=TARGET):
  out = losses.mask_terms(jnp.asarray(logits, jnp.float32)[None, None],
                          jnp.asarray([[iou_pred]], jnp.float32),
                          jnp.asarray(target, bool)[None, None],
                          jnp.asarray([valid_hw], jnp.float32))
  return [float(v[0, 0]) for v in out]


def test_focal_dice_and_iou_error_by_hand():
  focal, dice, iou_error = _terms((1.0, 1.0))
  pixels = [(x, t) for row_x, row_t in zip(LOGITS, TARGET) for x, t in zip(row_x, row_t)]
  np.testing.assert_allclose(focal, sum(_focal_pixel(x, t) for x, t in pixels) / 4, rtol=1e-5)
  # Dice: sum p t = s(2) + s(0) = 0.8808 + 0.5; sum p = that + s(-1) + s(1) = that + 1; sum t = 2.
  inter = _sig(2.0) + 0.5
  np.testing.assert_allclose(dice, 1.0 - (2 * inter + 1) / ((inter + 1.0) + 2 + 1), rtol=1e-5)
  np.testing.assert_allclose(focal, 0.112452, rtol=1e-5)  # terms .000902 .011329 .086643 .350934
  np.testing.assert_allclose(dice, 0.300923, rtol=1e-5)
  # logit > 0 gives pixels (0, 0) and (1, 1); the target (0, 0) and (1, 0): IoU 1 / 3.
  np.testing.assert_allclose(iou_error, (0.5 - 1 / 3) ** 2, rtol=1e-5)


def test_padding_pixels_count_in_no_term():
  # Valid width 0.5: only the left column is image. Focal over its 2 pixels; the right column's
  # prediction (1, 1) no longer counts: the thresholded mask is (0, 0) alone, IoU 1 / 2.
  focal, dice, iou_error = _terms((1.0, 0.5), iou_pred=0.9)
  np.testing.assert_allclose(focal, (_focal_pixel(2.0, 1) + _focal_pixel(0.0, 1)) / 2, rtol=1e-5)
  inter = _sig(2.0) + 0.5
  np.testing.assert_allclose(dice, 1.0 - (2 * inter + 1) / (inter + 2 + 1), rtol=1e-5)
  np.testing.assert_allclose(iou_error, (0.9 - 0.5) ** 2, rtol=1e-5)
  # The padding's logits do not matter at all.
  other = [[2.0, 9.0], [0.0, -9.0]]
  np.testing.assert_allclose(_terms((1.0, 0.5), 0.9, logits=other), [focal, dice, iou_error],
                             rtol=1e-6)


def test_low_res_logits_are_upsampled_to_the_canvas():
  low = np.array([[1.5, -2.0], [0.5, -0.5]], np.float32)
  target = np.zeros((4, 4), bool)
  target[:, :2] = True
  canvas = segmentation.resize_bilinear(low, (4, 4))  # the evaluation's resize (hand-checked)
  focal, _, _ = _terms((1.0, 1.0), logits=low, target=target)
  want = np.mean([_focal_pixel(float(x), bool(t)) for x, t in zip(canvas.ravel(), target.ravel())])
  np.testing.assert_allclose(focal, want, rtol=1e-5)


def _batch(task_ids, masks=True):
  b, n = np.shape(task_ids)
  zeros = lambda *s: np.zeros((b, n, *s), np.float32)  # noqa: E731
  targets = np.zeros((b, n, 3), np.int32)
  targets[..., 0] = 1  # every slot: EOS at 0
  mask_targets = np.zeros((b, n, 2, 2), bool)
  mask_targets[...] = np.asarray(TARGET, bool)
  return Batch(image=np.zeros((b, 2, 2, 3), np.uint8), image_valid_hw=np.ones((b, 2), np.float32),
               prompt_boxes=np.zeros((b, 1, 4), np.float32),
               prompt_index=np.zeros((b, n), np.int32),
               context_tokens=np.ones((b, n, 1), np.int32), decoder_input_tokens=targets,
               decoder_target_tokens=targets, decoder_loss_weights=zeros(3),
               point_targets=zeros(3, 2, 2), point_weights=zeros(3),
               task_ids=np.asarray(task_ids, np.int32),
               mask_targets=mask_targets if masks else None)


def _output(b, n, iou_preds, with_masks=True):
  logits = np.broadcast_to(np.asarray(LOGITS, np.float32), (b, n, 2, 2))
  return Output(logits=jnp.zeros((b, n, 3, 8)), points=jnp.zeros((b, n, 3, 2, 2)),
                hidden=jnp.zeros((b, n, 3, 1)),
                mask_logits=jnp.asarray(logits) if with_masks else None,
                mask_iou=jnp.asarray(iou_preds, jnp.float32) if with_masks else None)


def test_compute_losses_averages_the_mask_slots_only():
  # Slot 0 refseg (IoU prediction 0.5), slot 1 refer (no mask loss whatever its masks), slot 2
  # refseg (prediction 1/3: no IoU error).
  batch = _batch([[TASK_ID["refseg"], TASK_ID["refer"], TASK_ID["refseg"]]])
  output = _output(1, 3, [[0.5, 0.0, 1 / 3]])
  config = losses.LossConfig(text_loss_weight=0.0, point_loss_weight=0.0, mask_loss_weight=2.0)
  total, metrics = losses.compute_losses(output, batch, config)
  focal, dice, iou_error = _terms((1.0, 1.0))
  per_slot = [20 * focal + dice + iou_error, 20 * focal + dice]
  np.testing.assert_allclose(metrics["mask_loss"], np.mean(per_slot), rtol=1e-5)
  np.testing.assert_allclose(total, 2.0 * np.mean(per_slot), rtol=1e-5)
  np.testing.assert_allclose(metrics["mask_focal"], focal, rtol=1e-5)
  np.testing.assert_allclose(metrics["mask_dice"], dice, rtol=1e-5)
  np.testing.assert_allclose(metrics["mask_iou_error"], iou_error / 2, rtol=1e-5)
  assert float(metrics["count/mask_loss"]) == 2.0
  # The weights of the three terms.
  weighted = losses.LossConfig(text_loss_weight=0.0, point_loss_weight=0.0, mask_focal_weight=1.0,
                               mask_dice_weight=0.0, mask_iou_weight=3.0)
  np.testing.assert_allclose(losses.compute_losses(output, batch, weighted)[1]["mask_loss"],
                             focal + 3 * iou_error / 2, rtol=1e-5)


def test_batches_without_mask_targets_log_zero_counts_and_mismatches_fail():
  batch = _batch([[TASK_ID["refer"], TASK_ID["refer"]]], masks=False)
  total, metrics = losses.compute_losses(_output(1, 2, None, with_masks=False), batch)
  assert float(metrics["mask_loss"]) == 0.0 and float(metrics["count/mask_loss"]) == 0.0
  with_masks = losses.compute_losses(_output(1, 2, [[0.5, 0.5]]),
                                     _batch([[TASK_ID["refer"]] * 2]))[1]
  assert set(with_masks) == set(metrics)  # every step logs the same names
  with pytest.raises(ValueError, match="no masks"):
    losses.compute_losses(_output(1, 2, None, with_masks=False),
                          _batch([[TASK_ID["refseg"]] * 2]))
