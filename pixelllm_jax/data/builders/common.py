"""Helpers shared by the tfds builders: files, images, boxes, skip counting.

- Images go to tfds as encoded bytes (TF is absent, so tfds cannot encode
  numpy arrays). RGB PNG/JPEG files pass through byte for byte; anything else
  (grey, palette, RGBA, other formats) is converted to RGB and re-encoded as
  PNG, so every record decodes to uint8[H, W, 3].
- A bad record raises `BadRecord(reason)`; the builder catches it, counts the
  reason in a `SkipCounter`, and stores the counts in the dataset's
  `metadata.json` (`builder.info.metadata['skipped'][split]`).
- A missing annotation file raises one `FileNotFoundError` listing every
  expected file (`check_files_exist`).
- `prepare` is what the training code calls. Processes that share a local
  `data_dir` (runs of a sweep started together) take turns through a file
  lock; the first prepares, the rest reuse its files. Multi-host runs order
  the hosts in `sources.data_source` (process 0 first).
- A prepared dataset records a fingerprint of its sources (`sources.json` in
  its version dir): every file or folder the builder asked `check_files_exist`
  for, with its size (a folder: its number of entries) and modification time.
  When the sources are present and differ, `prepare` says which changed and
  prepares the dataset again, so stale records are never served. When they are
  absent (prepared data copied to a host without the manual dir), the prepared
  data is served as it is, with a note.
"""
import collections
import contextlib
import fcntl
import glob
import importlib
import io
import json
import os
import pickle
import shutil
from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

_BOX_TOLERANCE_PX = 1.0  # COCO-style float boxes may overshoot the border by rounding

BUILDERS = {  # tfds name -> (module, class)
    "localized_narratives": ("pixelllm_jax.data.builders.localized_narratives", "LocalizedNarratives"),
    "refer": ("pixelllm_jax.data.builders.refer", "Refer"),
    "vg_densecap": ("pixelllm_jax.data.builders.vg_densecap", "VgDensecap"),
    "coco_captions": ("pixelllm_jax.data.builders.coco_captions", "CocoCaptions"),
}


class ManualDataBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders whose files the user downloads into the manual dir.

  `code_path = None`: tfds looks for a checksums file next to the builder's
  module through the `importlib_resources` package, which is not in our
  environment; these builders download nothing, so there is nothing to find.
  """

  code_path = None


class BadRecord(Exception):
  """A record that is skipped; `reason` is the counted category."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class SkipCounter:
  """Counts skipped records by reason; logs the first few of each reason."""

  def __init__(self, dataset: str, split: str, log_first: int = 3):
    self.dataset, self.split, self._log_first = dataset, split, log_first
    self.counts: collections.Counter[str] = collections.Counter()

  def skip(self, error: BadRecord, where: str) -> None:
    self.counts[error.reason] += 1
    if self.counts[error.reason] <= self._log_first:
      logging.warning("%s/%s: skipping %s: %s", self.dataset, self.split, where, error)

  def summary(self) -> str:
    if not self.counts:
      return f"{self.dataset}/{self.split}: no records skipped"
    parts = ", ".join(f"{n} x {reason}" for reason, n in sorted(self.counts.items()))
    return f"{self.dataset}/{self.split}: skipped {sum(self.counts.values())} ({parts})"


def record_skips(info: tfds.core.DatasetInfo, counter: SkipCounter) -> None:
  """Stores a split's skip counts in the DatasetInfo metadata and prints them."""
  info.metadata.setdefault("skipped", {})[counter.split] = dict(counter.counts)
  print(counter.summary())


def check_yielded(counter: SkipCounter, num_yielded: int) -> None:
  """tfds cannot write an empty split: say why instead (every record skipped)."""
  if not num_yielded:
    raise ValueError(f"{counter.dataset}/{counter.split}: no valid record to write; "
                     f"{counter.summary()}")


def skipped_counts(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """{split: {reason: count}} as stored by `record_skips` (empty if none)."""
  metadata = builder.info.metadata
  return dict(metadata.get("skipped", {})) if metadata is not None else {}


def check_files_exist(dataset: str, root: os.PathLike | str, patterns: Iterable[str]) -> dict[str, list[str]]:
  """Resolves glob `patterns` under `root`; one error lists every expected file.

  Returns {pattern: sorted matching paths}.
  """
  root = os.fspath(root)
  patterns = list(patterns)
  if _SOURCE_PATTERNS is not None:
    _SOURCE_PATTERNS.extend(p for p in patterns if p not in _SOURCE_PATTERNS)
  found = {p: sorted(glob.glob(os.path.join(root, p))) for p in patterns}
  missing = [p for p, paths in found.items() if not paths]
  if missing:
    lines = "\n".join(f"  {'MISSING' if not found[p] else 'found  '} {os.path.join(root, p)}"
                      for p in found)
    raise FileNotFoundError(
        f"{dataset}: {len(missing)} of {len(found)} expected files are missing under the "
        f"manual dir {root}:\n{lines}")
  return found


# Patterns (relative to the manual dir) of what the builder being prepared reads.
_SOURCE_PATTERNS: list[str] | None = None
SOURCES_FILE = "sources.json"


def source_fingerprint(manual_dir: str, patterns: Iterable[str]) -> dict[str, list[int]]:
  """{path relative to manual_dir: [entries or size, mtime_ns]} of every match of `patterns`."""
  out = {}
  for pattern in patterns:
    for path in sorted(glob.glob(os.path.join(manual_dir, pattern))):
      stat = os.stat(path)
      size = len(os.listdir(path)) if os.path.isdir(path) else stat.st_size
      out[os.path.relpath(path, manual_dir)] = [size, stat.st_mtime_ns]
  return out


def _changed_sources(stored: dict, manual_dir: str) -> list[str] | None:
  """The sources that changed since preparation; None when they cannot be checked here."""
  current = source_fingerprint(manual_dir, stored["patterns"])
  if not current:
    return None
  old, new = stored["files"], current
  return sorted({f"{p} ({'gone' if p not in new else 'new' if p not in old else 'changed'})"
                 for p in set(old) | set(new) if old.get(p) != new.get(p)})


def load_json(path: str) -> Any:
  """Parses a JSON file; a parse error names the file."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not valid UTF-8 JSON: {e}") from e


class _PlainDataUnpickler(pickle.Unpickler):
  """Refuses every global, so only dicts, lists, tuples, str, bytes, numbers load."""

  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name}: only plain containers are allowed")


def load_plain_pickle(path: str) -> Any:
  """Loads a pickle holding only plain data; anything else is refused.

  A data file must never run code, so a pickle that references any class or
  function (e.g. a `__reduce__` to `os.system`) raises ValueError naming the
  file, before anything is called.
  """
  try:
    with open(path, "rb") as f:
      return _PlainDataUnpickler(f, encoding="utf-8").load()
  except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{path}: refused or unreadable pickle: {e}") from e


def load_image(path: str) -> tuple[bytes, int, int]:
  """(encoded RGB PNG/JPEG bytes, width, height) of an image file.

  Raises BadRecord('missing image' / 'corrupt image') so callers can skip.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadRecord("missing image", f"{path}: {e.strerror}") from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decodes fully: truncated files fail here, not at read time
      if image.mode == "RGB" and image.format in ("PNG", "JPEG"):
        return data, image.width, image.height
      out = io.BytesIO()
      image.convert("RGB").save(out, format="PNG")
      return out.getvalue(), image.width, image.height
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadRecord("corrupt image", f"{path}: {e}") from e


def xywh_to_normalized_xyxy(box: Any, width: int, height: int) -> np.ndarray:
  """float32[4] normalized xyxy from a pixel [x, y, w, h] box.

  Raises BadRecord for a malformed box, a non-positive size, or a box outside
  the image (beyond a 1-pixel rounding tolerance, which is clipped away).
  """
  try:
    x, y, w, h = (float(v) for v in box)
  except (TypeError, ValueError) as e:
    raise BadRecord("malformed box", repr(box)) from e
  if not all(np.isfinite((x, y, w, h))):
    raise BadRecord("malformed box", repr(box))
  if w <= 0 or h <= 0:
    raise BadRecord("box with non-positive size", repr(box))
  tol = _BOX_TOLERANCE_PX
  if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
    raise BadRecord("box outside the image", f"{box!r} in a {width}x{height} image")
  xyxy = np.array([x / width, y / height, (x + w) / width, (y + h) / height], np.float64)
  xyxy = np.clip(xyxy, 0.0, 1.0).astype(np.float32)
  if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:  # only the overshoot was inside the tolerance
    raise BadRecord("box outside the image", f"{box!r} in a {width}x{height} image")
  return xyxy


def clean_text(value: Any, what: str) -> bytes:
  """UTF-8 bytes of a stripped, non-empty string; BadRecord otherwise."""
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord(f"non-UTF-8 {what}", repr(value[:40])) from e
  if not isinstance(value, str):
    raise BadRecord(f"malformed {what}", repr(value)[:80])
  value = value.strip()
  if not value:
    raise BadRecord(f"empty {what}")
  try:
    return value.encode("utf-8")
  except UnicodeEncodeError as e:  # lone surrogates from a bad JSON escape
    raise BadRecord(f"non-UTF-8 {what}", repr(value[:40])) from e


@contextlib.contextmanager
def _exclusive(data_dir: str, name: str):
  """Holds an exclusive lock on `data_dir/.name.lock` (local paths; a no-op for URLs
  such as gs://, where multi-host runs rely on the process order instead)."""
  if "://" in data_dir:
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(builder_name: str, config_name: str, manual_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds `builder_name/config_name` into array_record files (once) and returns it.

  Idempotent: tfds reuses an already prepared dataset in `data_dir`. The
  returned builder serves `builder.as_data_source(split)`.
  """
  if builder_name not in BUILDERS:
    raise ValueError(f"unknown builder {builder_name!r}; known: {sorted(BUILDERS)}")
  module_name, class_name = BUILDERS[builder_name]
  builder_cls = getattr(importlib.import_module(module_name), class_name)
  name = f"{builder_name}/{config_name}"
  with _exclusive(data_dir, f"{builder_name}-{config_name}"):
    # Built inside the lock: a builder made before another process finished would not
    # see the finished version and would prepare again.
    builder = builder_cls(config=config_name, data_dir=data_dir, file_format="array_record")
    sources_path = os.path.join(builder.data_dir, SOURCES_FILE)
    if os.path.exists(sources_path):
      with open(sources_path) as f:
        changed = _changed_sources(json.load(f), manual_dir)
      if changed is None:
        print(f"{name}: its sources are not under {manual_dir}; serving the prepared data "
              f"in {builder.data_dir} unchecked")
      elif changed:
        print(f"{name}: sources changed since it was prepared: {', '.join(changed)}; "
              "preparing it again")
        shutil.rmtree(builder.data_dir)
        builder = builder_cls(config=config_name, data_dir=data_dir, file_format="array_record")
    prepared_before = os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    global _SOURCE_PATTERNS
    _SOURCE_PATTERNS = []
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
      patterns = _SOURCE_PATTERNS
    finally:
      _SOURCE_PATTERNS = None
    if not prepared_before:
      with open(sources_path, "w") as f:
        json.dump({"patterns": patterns, "files": source_fingerprint(manual_dir, patterns)}, f,
                  indent=1)
  skipped = {split: counts for split, counts in skipped_counts(builder).items() if counts}
  print(f"{builder_name}/{config_name} in {builder.data_dir}: "
        f"{'skipped ' + json.dumps(skipped) if skipped else 'nothing skipped'}")
  return builder
