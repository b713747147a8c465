"""Training losses (DESIGN.md section 2).

- Caption cross entropy with GRiT-style label smoothing: target probability
  1 - eps on the true token and eps / (V - 1) on every other id, averaged over
  tokens with non-zero `decoder_loss_weights` (pad targets carry weight 0).
- Localization L1: mean over the P points and xy of |pred - target| for tokens
  with non-zero `point_weights`, averaged over those tokens. Coordinates are
  normalized to [0, 1]; the official code used pixels on a 384 canvas with
  weight 0.1, which is weight 38.4 here (the default).
"""
import dataclasses

import gin
import jax
import jax.numpy as jnp

from pixelllm_jax.batch import Batch, Output, TASKS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  label_smoothing: float = 0.1
  point_loss_weight: float = 38.4
  text_loss_weight: float = 1.0


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


@gin.configurable
def compute_losses(
    output: Output, batch: Batch, config: LossConfig = LossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (total loss, metrics). Metrics are scalars safe to average."""
  text_w = batch.decoder_loss_weights.astype(jnp.float32)
  ce = smoothed_cross_entropy(output.logits, batch.decoder_target_tokens, config.label_smoothing)
  text_count = jnp.sum(text_w)
  text_loss = jnp.sum(ce * text_w) / jnp.maximum(text_count, 1.0)

  point_w = batch.point_weights.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(output.points - batch.point_targets), axis=(-1, -2))
  point_count = jnp.sum(point_w)
  point_loss = jnp.sum(l1 * point_w) / jnp.maximum(point_count, 1.0)

  total = config.text_loss_weight * text_loss + config.point_loss_weight * point_loss
  correct = (jnp.argmax(output.logits, axis=-1) == batch.decoder_target_tokens)
  metrics = {
      "loss": total,
      "text_loss": text_loss,
      "point_loss": point_loss,
      "token_accuracy": jnp.sum(correct * text_w) / jnp.maximum(text_count, 1.0),
      "text_tokens": text_count,
      "point_tokens": point_count,
  }
  for i, name in enumerate(TASKS):
    metrics[f"slots/{name}"] = jnp.sum(batch.task_ids == i).astype(jnp.float32)
  return total, metrics
