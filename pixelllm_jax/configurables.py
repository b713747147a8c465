"""Everything a gin file may build, registered in one place (gin only at the edges).

Library code never imports gin: its config dataclasses and functions are plain,
so building one bare (`LoraConfig()`) gives its defaults whatever a gin file
bound. Gin builds them only where a gin file asks (`@LoraConfig()`), through
the factories registered here under the classes' own names. Each factory has
the signature of what it builds, so gin rejects a misspelt parameter when it
parses the binding, and returns the plain object (not a gin subclass).

Gin files `import pixelllm_jax.configurables` to make these names known.
"""
import inspect
from typing import Any, Callable

import gin

from pixelllm_jax import losses, partitioning
from pixelllm_jax.data import sources
from pixelllm_jax.eval import evaluator
from pixelllm_jax.lora import LoraConfig
from pixelllm_jax.model import DecodeSettings, PixelLLMModel
from pixelllm_jax.models import t5
from pixelllm_jax.models.eva02 import EVA02Config
from pixelllm_jax.models.heads.localization import LocHeadConfig
from pixelllm_jax.models.heads.detection import BoxHeadConfig
from pixelllm_jax.models.heads.mask import MaskHeadConfig
from pixelllm_jax.models.mask_decoder import MaskDecoderConfig
from pixelllm_jax.models.pixel_llm import PixelLLMConfig
from pixelllm_jax.models.prompt_encoder import PromptEncoderConfig
from pixelllm_jax.models.prompt_extractor import PromptExtractorConfig
from pixelllm_jax.models.sam_vit import SamViTConfig
from pixelllm_jax.tasks import TaskConfig
from pixelllm_jax.train import optim, trainer


def _register(target: Callable[..., Any], name: str) -> Callable[..., Any]:
  """Registers a factory that calls `target` under gin name `name` (module docstring)."""

  def factory(*args, **kwargs):
    return target(*args, **kwargs)

  factory.__signature__ = inspect.signature(target)
  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = target.__doc__
  return gin.external_configurable(factory, name=name)


REGISTERED: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}
"""gin name -> (the library object, its gin factory)."""

for _target, _name in (
    # The model and its parts.
    (PixelLLMModel, "PixelLLMModel"),
    (PixelLLMConfig, "PixelLLMConfig"),
    (t5.T5Config, "T5Config"),
    (t5.t5_1_1_config, "t5_1_1_config"),
    (LoraConfig, "LoraConfig"),
    (EVA02Config, "EVA02Config"),
    (SamViTConfig, "SamViTConfig"),
    (PromptEncoderConfig, "PromptEncoderConfig"),
    (PromptExtractorConfig, "PromptExtractorConfig"),
    (LocHeadConfig, "LocHeadConfig"),
    (MaskDecoderConfig, "MaskDecoderConfig"),
    (MaskHeadConfig, "MaskHeadConfig"),
    (BoxHeadConfig, "BoxHeadConfig"),
    (losses.LossConfig, "LossConfig"),
    # How it is laid out and computed.
    (partitioning.Partitioner, "Partitioner"),
    (partitioning.DtypePolicy, "DtypePolicy"),
    (partitioning.RematPolicy, "RematPolicy"),
    # Data.
    (sources.DataConfig, "DataConfig"),
    (TaskConfig, "TaskConfig"),
    (sources.train_data, "train_data"),
    # Loops.
    (optim.make_optimizer, "make_optimizer"),
    (trainer.train, "train"),
    (evaluator.evaluate, "evaluate"),
    (DecodeSettings, "DecodeSettings"),
):
  REGISTERED[_name] = (_target, _register(_target, _name))

train = REGISTERED["train"][1]
evaluate = REGISTERED["evaluate"][1]
