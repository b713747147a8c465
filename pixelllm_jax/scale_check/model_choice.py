"""The model the check compiles: the parsed gin config's, changed only where a flag says so."""
import dataclasses
from typing import Any

from pixelllm_jax import cli, losses, partitioning
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.models import t5
from pixelllm_jax.train import optim


@dataclasses.dataclass(frozen=True)
class Choices:
  """What the flags change in the gin config (None: keep the config's).

  remat: RematPolicy.mode for every tower; compute_dtype: DtypePolicy.compute_dtype;
  t5: a T5 v1.1 size name ('xxl': Flan-T5-XXL); scan: every tower config's `scan` field.
  """
  remat: str | None = None
  compute_dtype: str | None = None
  t5: str | None = None
  scan: bool | None = None


def gin_value(name: str, default: Any) -> Any:
  """What gin binds to `name` (macros and @references evaluated), or `default` if unbound."""
  value = cli.build(name)
  return default if value is None else value


def scan_towers(config: Any) -> list[str]:
  """The composer config's tower fields whose configs have a `scan` field."""
  return [f.name for f in dataclasses.fields(config)
          if dataclasses.is_dataclass(getattr(config, f.name))
          and "scan" in {g.name for g in dataclasses.fields(getattr(config, f.name))}]


def with_scan(config: Any, scan: bool | None) -> tuple[Any, bool | None]:
  """(config with `scan` set on every tower that has the field, the scan in effect: None when
  no tower has the field yet, or `scan` is None and the towers disagree)."""
  towers = scan_towers(config)
  if not towers:
    return config, None
  if scan is None:
    values = {bool(getattr(config, name).scan) for name in towers}
    return config, values.pop() if len(values) == 1 else None
  return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), scan=scan)
                                        for name in towers}), scan


def with_t5_size(config: Any, size: str | None) -> Any:
  """`config` with its T5 resized to a T5 v1.1 / Flan-T5 size (LoRA, vocabulary, dropout kept)."""
  if size is None:
    return config
  if size not in t5.T5_1_1_SIZES:
    raise ValueError(f"T5 size {size!r}: choose from {sorted(t5.T5_1_1_SIZES)}")
  d_model, heads, d_kv, d_ff, depth = t5.T5_1_1_SIZES[size]
  return dataclasses.replace(config, t5=dataclasses.replace(
      config.t5, d_model=d_model, num_heads=heads, d_kv=d_kv, d_ff=d_ff,
      num_encoder_layers=depth, num_decoder_layers=depth))


def t5_size_name(config: t5.T5Config) -> str:
  """The T5 v1.1 size `config` has ('xl', 'xxl', ...), else its width ('d512')."""
  dims = (config.d_model, config.num_heads, config.d_kv, config.d_ff, config.num_encoder_layers)
  names = [name for name, size in t5.T5_1_1_SIZES.items() if size == dims]
  return names[0] if names else f"d{config.d_model}"


def build_model(choices: Choices) -> tuple[PixelLLMModel, Any, bool | None]:
  """(model, optimizer with the model's freezing, scan in effect) from the parsed gin config."""
  config = cli.build("PixelLLMModel.config")
  if config is None:
    raise ValueError("the gin config binds no PixelLLMModel.config (give a model or run file)")
  dtype = gin_value("PixelLLMModel.dtype", partitioning.DtypePolicy())
  remat = gin_value("PixelLLMModel.remat", partitioning.RematPolicy())
  if choices.compute_dtype is not None:
    dtype = dataclasses.replace(dtype, compute_dtype=choices.compute_dtype)
  if choices.remat is not None:
    remat = dataclasses.replace(remat, mode=choices.remat)
  config, scan = with_scan(with_t5_size(config, choices.t5), choices.scan)
  model = PixelLLMModel(config, gin_value("PixelLLMModel.loss", losses.LossConfig()),
                        dtype=dtype, remat=remat)
  # The config's optimizer when it binds one (run files do); any AdamW costs the same.
  optimizer = gin_value("train.optimizer", None)
  if optimizer is None:
    optimizer = optim.make_optimizer(learning_rate=1e-4, warmup_steps=1, total_steps=2,
                                     weight_decay=0.0)
  return model, optim.with_frozen(optimizer, model.trainable), scan
