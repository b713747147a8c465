"""Analytic model FLOPs of a PixelLLM training step, from the config and the batch shape.

Used by scripts/benchmark_gpu.py for model FLOP utilization (MFU). "Model FLOPs" as in PaLM's
MFU: the arithmetic the step needs, 2 FLOPs per multiply-add, without the recomputation that
rematerialization adds (XLA's `cost_analysis` of the compiled step counts that too, and counts a
scanned loop's body once, so it is reported beside this count, not used for MFU).

Counted: every matmul, conv and attention product (q.k and p.v) of the towers, the prompt
feature extractor, the visual projection, the T5 encoder and decoder (LoRA adapters included),
the logits and the localization head. Left out (under 1% at paper scale): norms, activations,
softmax, embeddings and position-embedding resizes, the fusion resize, SAM's prompt encoder.
Padding is counted where the model computes it: SAM's windowed blocks project and attend over
the map padded to whole windows; every caption slot and text position is computed (pads too).

Backward pass, per product y = x W (PixelLLMConfig.frozen decides what trains):
- dW (as many FLOPs as the forward product) where W trains;
- dX (as many again) where a gradient must pass x: something upstream or earlier in the same
  tower trains. A frozen image tower (SAM in the paper configs) is cut from the graph
  (`PixelLLM._input_tower`), so it costs its forward only; a frozen T5 base with LoRA
  adapters still passes gradients (dX) through every layer;
- attention products double (dq, dk and dp, dv) wherever a gradient passes;
- the first layer of an image tower (the patch embedding) needs no dX: its input is pixels.
"""
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """B images, K prompts per image, N caption slots per image, L decoder and Lc context tokens."""
  batch: int
  num_prompts: int
  num_slots: int
  length: int
  context_length: int


@dataclasses.dataclass
class Part:
  """One component's forward FLOPs, split by how its backward pass is counted."""
  first: float = 0.0      # products on the tower's input pixels: dW only
  weights: float = 0.0    # products with the component's own weights: dW and dX
  attention: float = 0.0  # products of two activations: two gradients
  lora: float = 0.0       # LoRA adapter products (always trained)

  @property
  def forward(self) -> float:
    return self.first + self.weights + self.attention + self.lora


def _eva02(cfg, image_size: int, b: int) -> Part:
  g = image_size // cfg.patch_size
  t = g * g + 1  # CLS token
  d, m = cfg.width, cfg.mlp_dim
  return Part(first=2 * b * g * g * 3 * cfg.patch_size ** 2 * d,
              weights=cfg.depth * 2 * b * t * (4 * d * d + 3 * d * m),
              attention=cfg.depth * 4 * b * t * t * d)


def _sam(cfg, image_size: int, b: int) -> Part:
  g = image_size // cfg.patch_size
  w = cfg.window_size
  gp = math.ceil(g / w) * w           # windowed blocks pad the map to whole windows
  d, m, c = cfg.width, cfg.mlp_dim, cfg.out_channels
  n_global = sum(1 for i in range(cfg.depth) if i in cfg.global_blocks)
  n_window = cfg.depth - n_global
  tokens, tokens_padded = b * g * g, b * gp * gp
  weights = (2 * (n_window * tokens_padded + n_global * tokens) * 4 * d * d
             + cfg.depth * 2 * tokens * 2 * d * m
             + 2 * tokens * d * c + 2 * tokens * 9 * c * c)  # neck: 1x1 conv, 3x3 conv
  attention = (n_window * 4 * tokens_padded * w * w * d + n_global * 4 * tokens * g * g * d)
  if cfg.use_rel_pos:  # decomposed rel-pos: q against the row and the column tables
    attention += n_window * 2 * tokens_padded * 2 * w * d + n_global * 2 * tokens * 2 * g * d
  return Part(first=2 * tokens * 3 * cfg.patch_size ** 2 * d, weights=weights,
              attention=attention)


def _grid(config) -> tuple[int, int]:
  """(tokens of the fused map, its channels): the largest tower grid, channels concatenated."""
  grids, channels = [], 0
  if config.eva02 is not None:
    grids.append(config.image_size // config.eva02.patch_size)
    channels += config.eva02.width
  if config.sam is not None:
    grids.append(config.image_size // config.sam.patch_size)
    channels += config.sam.out_channels
  return max(grids) ** 2, channels


def _extractor(config, shape: BatchShape) -> Part:
  cfg, dp = config.extractor, config.prompt_encoder.embed_dim
  s, c = _grid(config)
  n_points = config.prompt_points_per_side
  tp = n_points * n_points if n_points else 2       # prompt tokens: grid points or box corners
  bk = shape.batch * shape.num_prompts
  w, i, n = cfg.width, cfg.width // 2, cfg.num_queries + tp  # cross-attention at width / 2
  weights = 2 * shape.batch * s * c * w              # image projection, once per image
  if dp != w:                                        # prompt-side projections
    weights += 2 * s * dp * w + 2 * (bk * tp + 1) * dp * w
  # Per prompt: token self-attention, token-to-image (q, out on tokens; k, v on the image),
  # MLP, image-to-token (q, out on the image; k, v on tokens), then a final token-to-image.
  token_side = 2 * n * 4 * w * w + 2 * n * w * i * 2 + 2 * n * 2 * w * cfg.mlp_dim + 2 * n * w * i * 2
  image_side = 2 * s * w * i * 2 + 2 * s * w * i * 2
  weights += bk * (cfg.depth * (token_side + image_side) + 2 * n * w * i * 2 + 2 * s * w * i * 2)
  # The first block's image-side inputs (k, v of token-to-image, q of image-to-token) do not
  # depend on the prompt yet: the extractor is vmapped over prompts with the image broadcast,
  # so they are computed once per image.
  if cfg.depth:
    weights -= (bk - shape.batch) * 2 * s * w * i * 3
  attention = bk * (cfg.depth * (4 * n * n * w + 2 * 4 * n * s * i) + 4 * n * s * i)
  if cfg.fuse in ("sparse", "sparse+dense"):
    weights += 2 * bk * cfg.num_queries * w * cfg.output_dim
  if cfg.fuse in ("dense", "sparse+dense"):
    weights += 2 * bk * s * w * cfg.output_dim
  return Part(weights=weights, attention=attention)


def _visual_tokens(config) -> int:
  s, _ = _grid(config)
  return config.extractor.num_tokens((int(math.isqrt(s)),) * 2)


def _t5(config, shape: BatchShape) -> tuple[Part, Part]:
  """(encoder, decoder with logits) of every caption slot."""
  cfg, lora = config.t5, config.t5.lora
  seqs = shape.batch * shape.num_slots
  le, ld = _visual_tokens(config) + shape.context_length, shape.length
  d, hk = cfg.d_model, cfg.num_heads * cfg.d_kv
  mlp = (3 if cfg.feed_forward == "gated-gelu" else 2) * d * cfg.d_ff
  adapter = 2 * lora.rank * (d + hk) if lora.rank else 0  # one adapted projection, per token
  enc = Part(weights=cfg.num_encoder_layers * 2 * seqs * le * (4 * d * hk + mlp),
             attention=cfg.num_encoder_layers * 4 * seqs * le * le * hk,
             lora=cfg.num_encoder_layers * seqs * le * adapter * len(lora.encoder_self))
  cross_kv = sum(1 for p in lora.decoder_cross if p in ("k", "v"))
  dec = Part(
      weights=(cfg.num_decoder_layers * 2 * seqs * (ld * (6 * d * hk + mlp) + le * 2 * d * hk)
               + 2 * seqs * ld * d * cfg.vocab_size),
      attention=cfg.num_decoder_layers * 4 * seqs * hk * (ld * ld + ld * le),
      lora=cfg.num_decoder_layers * seqs * adapter * (
          ld * len(lora.decoder_self) + ld * (len(lora.decoder_cross) - cross_kv) + le * cross_kv))
  return enc, dec


def _loc_head(config, shape: BatchShape) -> Part:
  cfg, d = config.loc_head, config.t5.d_model
  out = 2 * cfg.points_per_token
  h = cfg.hidden_dim
  per_token = d * out if cfg.depth == 1 else d * h + (cfg.depth - 2) * h * h + h * out
  return Part(weights=2 * shape.batch * shape.num_slots * shape.length * per_token)


def train_step_flops(config, shape: BatchShape) -> dict:
  """Model FLOPs of one training step of `config` (a PixelLLMConfig) on batches of `shape`.

  Returns {'forward', 'backward', 'total', 'per_part': {name: {'forward', 'backward'}}}.
  """
  frozen = set(config.frozen)
  parts = []  # (name, Part, trains its weights, a gradient reaches its input)
  trained_upstream = False
  for name, cfg, fn in (("eva02", config.eva02, _eva02), ("sam", config.sam, _sam)):
    if cfg is not None:
      trains = name not in frozen
      parts.append((name, fn(cfg, config.image_size, shape.batch), trains, False))
      trained_upstream |= trains
  for name, part in (("extractor", _extractor(config, shape)),):
    trains = name not in frozen
    parts.append((name, part, trains, trained_upstream))
    trained_upstream |= trains
  visual = Part(weights=2 * shape.batch * shape.num_prompts * _visual_tokens(config)
                * config.extractor.output_dim * config.t5.d_model)
  parts.append(("visual_proj", visual, "visual_proj" not in frozen, trained_upstream))
  trained_upstream |= "visual_proj" not in frozen
  enc, dec = _t5(config, shape)
  t5_trains, t5_lora = "t5" not in frozen, config.t5.lora.rank > 0
  parts.append(("t5_encoder", enc, t5_trains, trained_upstream))
  trained_upstream |= t5_trains or t5_lora
  parts.append(("t5_decoder", dec, t5_trains, trained_upstream))
  trained_upstream |= t5_trains or t5_lora
  parts.append(("loc_head", _loc_head(config, shape), "loc_head" not in frozen,
                trained_upstream and config.loc_grad_to_lm))

  per_part, forward, backward = {}, 0.0, 0.0
  for name, part, trains, grad_in in parts:
    # A gradient passes inside a component when its input needs one or its own weights
    # (adapters included) train: later layers then pass it back to earlier ones.
    passes = grad_in or trains or part.lora > 0
    bwd = (part.first * trains + part.weights * (trains + passes)
           + part.attention * 2 * passes + part.lora * 2)
    per_part[name] = {"forward": part.forward, "backward": float(bwd)}
    forward += part.forward
    backward += bwd
  return {"forward": float(forward), "backward": float(backward),
          "total": float(forward + backward), "per_part": per_part}
