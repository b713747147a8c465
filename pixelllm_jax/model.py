"""The model API between the network and the loops, in the manner of t5x's `BaseModel`.

Training, evaluation and inference call only these methods; none of them knows
the composer's call signature, the losses or how decoding works:
  init(rng, batch)               -> boxed params (every leaf carries logical axis names)
  loss(params, batch, rng)       -> (float32[] loss, {name: float32[]} metrics)
  loss_normalizers(batch)        -> what the loss's averages divide by (no params)
  loss_share(params, part, rng, normalizers) -> a micro-batch's additive share of the loss
  predict(params, batch, settings) -> Predictions (tokens, per-token points, boxes, masks)
  dense_caption(params, batch, settings) -> Predictions of the model's own detections
  score(params, batch)           -> float32[B, N] log-likelihood of each slot's target
  trainable(path)                -> whether a parameter trains (the freezing switch)
  check_batch(batch)             -> raises at start-up when the data does not fit the model
All of them are pure functions of arrays, ready for `jax.jit`; `batch` is a
`batch.Batch` (numpy or jax leaves).

`PixelLLMModel` applies the run's dtype and remat policies (partitioning.py)
to its config once, at construction.
"""
import abc
import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from pixelllm_jax import beam_search, decoding, losses, partitioning
from pixelllm_jax.batch import EOS_ID, Batch, Output
from pixelllm_jax.models.heads import detection as detection_lib
from pixelllm_jax.models.heads.localization import points_at, points_to_boxes
from pixelllm_jax.models.pixel_llm import PixelLLM, PixelLLMConfig

DECODE_MODES = ("greedy", "beam", "teacher_forced")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How `predict` reads a batch.

  mode: 'greedy' generates up to `max_len` tokens per slot with the KV cache;
    'beam' runs beam search (beam_search.py) with the cache;
    'teacher_forced' reads the batch's own targets (referring boxes, trace points).
  max_len: tokens generated at most (greedy, beam).
  beam_size, alpha: beams kept per slot and the brevity penalty exponent (official: captions
    and traces beam 4, alpha 0.6; referring beam 3).
  suppress_repeat: clamp the logit of the token just emitted (official GRiT trick; greedy
    decoding with it goes through beam search with one beam).
  sample_seed: None decodes deterministically; an int samples instead (Gumbel top-k over
    the beams' candidates at `temperature`: with one beam, ancestral sampling), from
    `jax.random.key(sample_seed)` folded with the step, the same for every batch.
  """
  mode: str = "greedy"
  max_len: int = 32
  beam_size: int = 1
  alpha: float = 0.0
  suppress_repeat: bool = False
  sample_seed: int | None = None
  temperature: float = 1.0

  def __post_init__(self):
    if self.mode not in DECODE_MODES:
      raise ValueError(f"DecodeSettings.mode must be one of {DECODE_MODES}, got {self.mode!r}")
    if self.max_len < 1:
      raise ValueError(f"DecodeSettings.max_len must be >= 1, got {self.max_len}")
    if self.beam_size < 1 or (self.mode != "beam" and self.beam_size != 1):
      raise ValueError(f"DecodeSettings.beam_size {self.beam_size}: >= 1, and 1 unless "
                       "mode='beam'")
    if self.sample_seed is not None and (self.mode == "teacher_forced" or self.temperature <= 0):
      raise ValueError("DecodeSettings.sample_seed samples a generating mode ('greedy' or 'beam') "
                       f"at a positive temperature; got mode {self.mode!r}, temperature "
                       f"{self.temperature}")


@flax.struct.dataclass
class Predictions:
  """What the model says about each caption slot.

  tokens: int32[B, N, T]: generated (words, EOS, then pad) or the given targets.
  points: float32[B, N, T, P, 2]: points[..., t, :, :] localizes tokens[..., t]
    (normalized xy); points at EOS and after carry no meaning.
  boxes: float32[B, N, 4]: xyxy min/max of the points read where the sequence
    ends (the position whose target is EOS: the referring box).
  mask_logits: float32[B, N, 4h, 4w]: the mask head's low-res logits over the
    canvas, segmenting each slot from its box (teacher forced, models with a
    mask head; else None).
  mask_iou: float32[B, N]: the mask head's predicted IoU of each mask (or None).
  scores, valid: float32[B, N] and bool[B, N] (`dense_caption` only, else None):
    slot n is detection n, `boxes` its box (not read from the points), `scores`
    its detection score, `valid` whether it is a detection or padding.
  """
  tokens: jax.Array
  points: jax.Array
  boxes: jax.Array
  mask_logits: jax.Array | None = None
  mask_iou: jax.Array | None = None
  scores: jax.Array | None = None
  valid: jax.Array | None = None


class BaseModel(abc.ABC):
  """What the loops need from a model (module docstring)."""

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Batch) -> Any:
    """Boxed params (`nn.LogicallyPartitioned` leaves) for batches shaped like `batch`."""

  @abc.abstractmethod
  def loss(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    """(scalar loss, metrics) of a training step; `rng` drives dropout."""

  def loss_normalizers(self, batch: Batch) -> Any:
    """The denominators of the loss's averages over `batch` (a pytree of arrays), from
    the batch alone. With `loss_share` it makes gradient accumulation exact."""
    raise NotImplementedError(f"{type(self).__name__} does not split its loss into "
                              "micro-batch shares (loss_normalizers / loss_share)")

  def loss_share(self, params: Any, batch: Batch, rng: jax.Array,
                 normalizers: Any) -> tuple[jax.Array, dict]:
    """(loss, metrics) of `batch` as an additive share of a larger batch whose
    `loss_normalizers` are given: summed over the parts of that batch, the loss, its
    gradient and every metric equal `loss` of the whole (dropout aside)."""
    raise NotImplementedError(f"{type(self).__name__} does not split its loss into "
                              "micro-batch shares (loss_normalizers / loss_share)")

  def predict(self, params: Any, batch: Batch, settings: DecodeSettings) -> Predictions:
    raise NotImplementedError(f"{type(self).__name__} does not predict")

  def score(self, params: Any, batch: Batch) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} does not score")

  def dense_caption(self, params: Any, batch: Batch, settings: DecodeSettings) -> Predictions:
    """Detects the regions of `batch.image` and captions each (dense captioning)."""
    raise NotImplementedError(f"{type(self).__name__} does not caption densely")

  def trainable(self, path: Sequence[str]) -> bool:
    """Whether the parameter at `path` (names below 'params') trains."""
    del path
    return True

  def check_batch(self, batch: Batch) -> None:
    """Raises a clear error when `batch` cannot be what this model reads."""
    del batch

  def check_vocab(self, vocab_size: int, where: str = "the tokenizer") -> None:
    """Raises a clear error when token ids up to `vocab_size` do not fit the model."""
    del vocab_size, where


def _inputs(batch: Batch) -> dict[str, jax.Array]:
  """The composer's arguments, from the batch fields of the same names."""
  return {name: getattr(batch, name) for name in (
      "image", "image_valid_hw", "prompt_boxes", "prompt_index", "context_tokens",
      "decoder_input_tokens")}


def _end_index(tokens_BNT: jax.Array) -> jax.Array:
  """int32[B, N]: the first EOS position, or T when a row has none."""
  is_eos = tokens_BNT == EOS_ID
  return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), tokens_BNT.shape[-1])


class PixelLLMModel(BaseModel):
  """PixelLLM behind the model API.

  Attributes:
    config: the composer config, with the dtype and remat policies applied.
    module: the `PixelLLM` linen module built from it.
    loss_config: the training losses' settings.
    dtype: the dtype policy (parameters are stored in `dtype.param_dtype`).
  """

  def __init__(self, config: PixelLLMConfig, loss: losses.LossConfig = losses.LossConfig(),
               dtype: partitioning.DtypePolicy = partitioning.DtypePolicy(),
               remat: partitioning.RematPolicy = partitioning.RematPolicy()):
    self.config = remat.apply(dtype.apply(config))
    self.module = PixelLLM(self.config)
    self.loss_config, self.dtype = loss, dtype

  def init(self, rng: jax.Array, batch: Batch) -> Any:
    # A mask head's branch is traced whatever the batch holds (the official force_init),
    # so its parameters exist when the first batch carries no masks.
    positions = (None if self.config.mask_head is None
                 else _end_index(batch.decoder_target_tokens))
    # Likewise the box decoder's, from one placeholder box per image.
    det = {}
    if self.config.box_head is not None:
      b = batch.image.shape[0]
      det = dict(det_boxes=jnp.zeros((b, 1, 4), jnp.float32), det_valid=jnp.zeros((b, 1), bool))
    variables = self.module.init({"params": rng, "dropout": rng}, **_inputs(batch), train=False,
                                 mask_positions=positions, **det)
    return self.dtype.cast_params(variables["params"])

  def abstract_batch(self, batch_size: int = 1, num_slots: int = 1, num_prompts: int = 1,
                     length: int = 8, context_length: int = 8) -> Batch:
    """A Batch of `jax.ShapeDtypeStruct`s at the model's canvas (for abstract inits
    and compile-only checks)."""
    b, n, k, size = batch_size, num_slots, num_prompts, self.config.image_size
    p = self.config.loc_head.points_per_token
    s = jax.ShapeDtypeStruct
    return Batch(
        image=s((b, size, size, 3), jnp.uint8), image_valid_hw=s((b, 2), jnp.float32),
        prompt_boxes=s((b, k, 4), jnp.float32), prompt_index=s((b, n), jnp.int32),
        context_tokens=s((b, n, context_length), jnp.int32),
        decoder_input_tokens=s((b, n, length), jnp.int32),
        decoder_target_tokens=s((b, n, length), jnp.int32),
        decoder_loss_weights=s((b, n, length), jnp.float32),
        point_targets=s((b, n, length, p, 2), jnp.float32),
        point_weights=s((b, n, length), jnp.float32), task_ids=s((b, n), jnp.int32))

  def apply(self, params: Any, batch: Batch, *, train: bool = False,
            rng: jax.Array | None = None, masks: bool | None = None,
            det_normalizers: Any = None) -> Output:
    """The teacher-forced forward pass (logits, points and hidden states), with each
    slot's mask read from its box at the target's EOS position when `masks` (default:
    when the batch carries mask targets), and the box decoder's losses when the batch
    carries detection targets (divided by `det_normalizers`, default the batch's own)."""
    if masks is None:
      masks = batch.mask_targets is not None
    if masks and self.config.mask_head is None:
      raise ValueError("the batch carries mask targets but the model has no mask head "
                       "(PixelLLMConfig.mask_head)")
    positions = _end_index(batch.decoder_target_tokens) if masks else None
    rngs = {"dropout": rng} if rng is not None else None
    return self.module.apply({"params": params}, **_inputs(batch), train=train, rngs=rngs,
                             mask_positions=positions, det_boxes=batch.det_boxes,
                             det_valid=batch.det_valid, det_normalizers=det_normalizers)

  def loss(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    output = self.apply(params, batch, train=True, rng=rng)
    return losses.compute_losses(output, batch, self.loss_config)

  def loss_normalizers(self, batch: Batch) -> losses.Normalizers:
    own = losses.normalizers(batch, self.loss_config)
    if batch.det_boxes is None or self.config.box_head is None:
      return own
    return own.replace(det=detection_lib.normalizers(
        batch.det_boxes, batch.det_valid, batch.image_valid_hw, self.config.fused_hw,
        self.config.box_head))

  def loss_share(self, params: Any, batch: Batch, rng: jax.Array,
                 normalizers: losses.Normalizers) -> tuple[jax.Array, dict]:
    output = self.apply(params, batch, train=True, rng=rng, det_normalizers=normalizers.det)
    return losses.compute_losses(output, batch, self.loss_config, whole=normalizers)

  def predict(self, params: Any, batch: Batch, settings: DecodeSettings) -> Predictions:
    if settings.mode == "teacher_forced":
      # Only the points (and masks) are returned: XLA drops the logits' vocabulary matmul.
      output = self.apply(params, batch, masks=self.config.mask_head is not None)
      points_in = output.points  # at decoder *input* positions
      tokens = batch.decoder_target_tokens
      boxes = points_to_boxes(points_at(points_in, _end_index(tokens)))
      # Target t is fed (and localized) at input position t + 1.
      points = jnp.concatenate([points_in[:, :, 1:], jnp.zeros_like(points_in[:, :, :1])], axis=2)
      return Predictions(tokens=tokens, points=points, boxes=boxes,
                         mask_logits=output.mask_logits, mask_iou=output.mask_iou)
    variables = {"params": params}
    encoded = self.module.apply(variables, batch.image, batch.image_valid_hw, batch.prompt_boxes,
                                batch.prompt_index, batch.context_tokens,
                                method=PixelLLM.encode)
    decoded = self._decode(variables, encoded, settings)
    # The last word sits just before EOS (the point read after it, as in training).
    boxes = points_to_boxes(points_at(decoded.points, _end_index(decoded.tokens) - 1))
    return Predictions(tokens=decoded.tokens, points=decoded.points, boxes=boxes)

  def dense_caption(self, params: Any, batch: Batch, settings: DecodeSettings) -> Predictions:
    """Every detection of each image (D = BoxHeadConfig.max_detections, padded) captioned
    with the text prompt of the batch's first slot ("an object of": dense captioning's),
    decoded as `settings` says (greedy or beam)."""
    if settings.mode == "teacher_forced":
      raise ValueError("dense_caption generates its captions: mode 'greedy' or 'beam'")
    variables = {"params": params}
    detections, encoded = self.module.apply(
        variables, batch.image, batch.image_valid_hw, batch.context_tokens[:, 0],
        method=PixelLLM.detect_and_encode)
    decoded = self._decode(variables, encoded, settings)
    return Predictions(tokens=decoded.tokens, points=decoded.points, boxes=detections.boxes,
                       scores=detections.scores, valid=detections.valid)

  def _decode(self, variables: Any, encoded: Any, settings: DecodeSettings):
    sampling = settings.sample_seed is not None
    if settings.mode == "beam" or settings.suppress_repeat or sampling:
      return beam_search.beam_search_pixel_llm(
          self.module, variables, encoded, settings.max_len, beam_size=settings.beam_size,
          alpha=settings.alpha, suppress_repeat=settings.suppress_repeat,
          rng=jax.random.key(settings.sample_seed) if sampling else None,
          temperature=settings.temperature)
    return decoding.greedy_decode_pixel_llm(self.module, variables, encoded, settings.max_len)

  def score(self, params: Any, batch: Batch) -> jax.Array:
    """float32[B, N]: sum of log p(target token) over each slot's non-pad targets."""
    logits = self.apply(params, batch, masks=False).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = batch.decoder_target_tokens
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * (targets > 0), axis=-1)

  def trainable(self, path: Sequence[str]) -> bool:
    return self.config.trainable(path)

  def check_vocab(self, vocab_size: int, where: str = "the tokenizer") -> None:
    if vocab_size > self.config.t5.vocab_size:
      raise ValueError(
          f"{where} has {vocab_size} ids (pieces + extra ids) but the model's vocabulary holds "
          f"{self.config.t5.vocab_size} (T5Config.vocab_size): larger ids would index past "
          "the embedding table; give a model vocabulary of at least the tokenizer's size")

  def check_batch(self, batch: Batch) -> None:
    size = self.config.image_size
    hw = tuple(batch.image.shape[1:3])
    if hw != (size, size):
      raise ValueError(
          f"the data's images are {hw[0]}x{hw[1]} but the model's canvas is {size}x{size} "
          f"(PixelLLMConfig.image_size): give the data pipeline canvas_size={size} "
          "(train_data.canvas_size / evaluate.canvas_size) or set image_size to the images' size")
    if batch.mask_targets is not None:
      if self.config.mask_head is None:
        raise ValueError("the data carries mask targets (a mask task such as refseg) but the "
                         "model has no mask head: give PixelLLMConfig.mask_head")
      if tuple(batch.mask_targets.shape[2:]) != (size, size):
        raise ValueError(f"mask targets {tuple(batch.mask_targets.shape[2:])} are not on the "
                         f"{size}x{size} canvas")
    if batch.det_boxes is not None and self.config.box_head is None:
      raise ValueError("the data carries detection targets (a detection task such as densecap) "
                       "but the model has no box decoder: give PixelLLMConfig.box_head")
    points = batch.point_targets.shape[-2]
    if points != self.config.loc_head.points_per_token:
      raise ValueError(f"the data has {points} points per token (TaskConfig.points_per_token) "
                       f"but the localization head predicts {self.config.loc_head.points_per_token}"
                       " (LocHeadConfig.points_per_token)")
