"""Parameter paths: jax key paths as tuples of names (the one helper for them).

A parameter's path is the names below the 'params' collection, e.g.
('t5', 'decoder', 'layers_0', 'self_attention', 'query', 'lora_a'); the
freezing switch, checkpoint loading and the optimizer all speak in these.
"""
from typing import Any, Sequence

Path = tuple[str, ...]


def path_of(key_path: Sequence[Any]) -> Path:
  """A jax key path (DictKey / GetAttrKey / SequenceKey entries) as a tuple of str."""
  out = []
  for entry in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(str(getattr(entry, attr)))
        break
    else:
      out.append(str(entry))
  return tuple(out)
