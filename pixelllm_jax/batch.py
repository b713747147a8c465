"""The typed batch the model consumes and the typed output it returns.

Conventions (see docs/CONVENTIONS.md):
- B images per batch, K distinct location prompts per image, N caption slots
  per image; each slot reads one prompt through `prompt_index`.
- Coordinates are normalized to [0, 1] of the unpadded image, xy order, origin
  top-left. Boxes are xyxy.
- Token ids follow T5: pad 0, eos 1, unk 2, decoder start 0.
- `decoder_input_tokens` is `decoder_target_tokens` shifted right by one with
  0 in front (t5x). Localization arrays are aligned with decoder *input*
  positions: position k localizes the token fed at k, i.e. the hidden state
  that has just read that token. The referring box sits at the position whose
  target is EOS (it has just read the last word of the expression).
"""
import flax.struct
import jax
import numpy as np

Array = jax.Array | np.ndarray

# T5 token ids (the tokenizer checks a sentencepiece model agrees).
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
DECODER_START_ID = 0
EMPTY_SLOT = -1  # task id of an unused caption slot
# Loss metrics: `COUNT_PREFIX + name` holds how many tokens metric `name` averages
# over in a step; the training loop's logging window weighs `name` by it, so a
# step without such tokens (a batch of another task) does not dilute it.
COUNT_PREFIX = "count/"


@flax.struct.dataclass
class Batch:
  image: Array                 # uint8[B, H, W, 3]
  image_valid_hw: Array        # float32[B, 2]: fraction of the canvas (h, w) holding the image
  prompt_boxes: Array          # float32[B, K, 4]
  prompt_index: Array          # int32[B, N]: which of the K prompts each slot reads
  context_tokens: Array        # int32[B, N, Lc]: text prompt + EOS, 0-padded
  decoder_input_tokens: Array  # int32[B, N, L]
  decoder_target_tokens: Array  # int32[B, N, L]
  decoder_loss_weights: Array  # float32[B, N, L]: caption cross-entropy weights
  point_targets: Array         # float32[B, N, L, P, 2]
  point_weights: Array         # float32[B, N, L]
  task_ids: Array              # int32[B, N]: index into tasks.TASKS, EMPTY_SLOT for padding
  # bool[B, N, H, W]: each slot's target mask on the canvas (all False for slots without
  # one). Only batches that hold a mask task carry it (tasks.base.Task.mask_loss); None
  # elsewhere, so other batches neither carry nor compute masks.
  mask_targets: Array | None = None
  # Detection targets (the box decoder of dense captioning): every ground-truth box of
  # the image, float32[B, G, 4] xyxy, and which are real, bool[B, G]. Only batches that
  # hold a detection task carry them (tasks.base.Task.detection_boxes); None elsewhere.
  det_boxes: Array | None = None
  det_valid: Array | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    """(B, N, L)."""
    return tuple(self.decoder_target_tokens.shape)  # type: ignore[return-value]


@flax.struct.dataclass
class Output:
  logits: Array   # float32[B, N, L, V]
  points: Array   # float32[B, N, L, P, 2], normalized coordinates
  hidden: Array   # float32[B, N, L, D]: final decoder hidden states (what the head reads)
  # The mask head's, when asked for (models/heads/mask.py), else None:
  mask_logits: Array | None = None  # float32[B, N, 4h, 4w]: low-res logits over the canvas
  mask_iou: Array | None = None     # float32[B, N]: the mask's predicted IoU
  # The box decoder's training losses, when the batch carries detection targets
  # (models/heads/detection.py): name -> float32[], already divided by the batch's
  # (or the whole batch's, for a micro-batch) normalizers; 'det_loss' is their weighted sum.
  det_losses: dict | None = None


def shift_right(target_tokens: np.ndarray) -> np.ndarray:
  """t5x decoder inputs: targets shifted right by one, decoder start id 0 in front."""
  out = np.zeros_like(target_tokens)
  out[..., 0] = DECODER_START_ID
  out[..., 1:] = target_tokens[..., :-1]
  return out
