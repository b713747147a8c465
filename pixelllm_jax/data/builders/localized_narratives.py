"""tfds builder for Localized Narratives (official JSONL layout) -> array_record.

One record per narrative (an image has one per annotator); see
docs/DATA_FORMATS.md "Builder records". Per-utterance boxes and time-averaged
points are computed here with `pixelllm_jax.data.trace` (official
preprocessing), so the training pipeline only has to align them to tokens.

Configs:
- `world`: the generated world, `D/localized_narratives/world_{split}_
  localized_narratives.jsonl` with images `D/images/world_{split}_{id:06d}.png`.
- `coco`: LN-COCO, `coco_{train,val}_localized_narratives*.jsonl` next to the
  COCO 2017 `train2017/` and `val2017/` image folders ({id:012d}.jpg).
"""
import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from pixelllm_jax.data import trace as trace_lib
from pixelllm_jax.data.builders import common

_REQUIRED_FIELDS = ("image_id", "annotator_id", "caption", "timed_caption", "traces")


@dataclasses.dataclass(eq=False)
class LocalizedNarrativesConfig(tfds.core.BuilderConfig):
  """Where one flavour of LN lives under the manual dir.

  `splits` holds (split name, JSONL glob, image path pattern), both paths
  relative to the manual dir; the pattern is formatted with `image_id` (an
  int when the LN id is all digits, else the string).
  """
  splits: tuple[tuple[str, str, str], ...] = ()


def _world_splits() -> tuple[tuple[str, str, str], ...]:
  return tuple((s, f"localized_narratives/world_{s}_localized_narratives.jsonl",
                f"images/world_{s}_{{image_id:06d}}.png") for s in ("train", "val", "test"))


class LocalizedNarratives(common.ManualDataBuilder):
  """Localized Narratives: caption, timed utterances, mouse trace per narrative."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the LN JSONL files and the source images in the manual dir, in the
  layout of the chosen config (see the module docstring), e.g. for `coco`:
  coco_train_localized_narratives-0000?-of-00004.jsonl,
  coco_val_localized_narratives.jsonl, train2017/, val2017/.
  """
  BUILDER_CONFIGS = [
      LocalizedNarrativesConfig(
          name="world", description="The generated grounded world.", splits=_world_splits()),
      LocalizedNarrativesConfig(
          name="coco", description="LN-COCO with COCO 2017 images.",
          splits=(("train", "coco_train_localized_narratives*.jsonl", "train2017/{image_id:012d}.jpg"),
                  ("val", "coco_val_localized_narratives*.jsonl", "val2017/{image_id:012d}.jpg"))),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_id": tfds.features.Text(),
        "annotator_id": np.int64,
        "caption": tfds.features.Text(),
        "utterances": tfds.features.Sequence(tfds.features.Text()),
        "utterance_times": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
        "utterance_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "utterance_points": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
        "trace": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features,
        homepage="https://google.github.io/localized-narratives/",
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = self.builder_config.splits
    image_dirs = [os.path.dirname(image_pattern) for _, _, image_pattern in splits]
    found = common.check_files_exist(
        f"{self.name}/{self.builder_config.name}", manual_dir,
        [pattern for _, pattern, _ in splits] + [d for d in dict.fromkeys(image_dirs) if d])
    return {split: self._generate_examples(split, found[pattern], manual_dir, image_pattern)
            for split, pattern, image_pattern in splits}

  def _generate_examples(self, split: str, jsonl_paths: list[str], manual_dir: str,
                         image_pattern: str) -> Iterator[tuple[str, dict[str, Any]]]:
    skips = common.SkipCounter(f"{self.name}/{self.builder_config.name}", split)
    seen: set[str] = set()
    for path in jsonl_paths:
      with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
          if not line.strip():
            continue
          where = f"{path}:{line_no}"
          try:
            key, example = _narrative_example(line, manual_dir, image_pattern)
            if key in seen:
              raise common.BadRecord("duplicate narrative", f"image_id/annotator_id {key}")
          except common.BadRecord as e:
            skips.skip(e, where)
            continue
          seen.add(key)
          yield key, example
    common.record_skips(self.info, skips)


def _narrative_example(line: bytes, manual_dir: str, image_pattern: str) -> tuple[str, dict[str, Any]]:
  """(key, tfds example) of one JSONL line; BadRecord when it must be skipped."""
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise common.BadRecord("non-UTF-8 line") from e
  except json.JSONDecodeError as e:
    raise common.BadRecord("invalid JSON", str(e)) from e
  if not isinstance(record, dict):
    raise common.BadRecord("invalid JSON", "a line is not an object")
  missing = [k for k in _REQUIRED_FIELDS if k not in record]
  if missing:
    raise common.BadRecord("missing field", ", ".join(missing))

  image_id = str(record["image_id"])
  try:
    annotator_id = int(record["annotator_id"])
  except (TypeError, ValueError) as e:
    raise common.BadRecord("malformed annotator_id", repr(record["annotator_id"])) from e
  caption = common.clean_text(record["caption"], "caption")

  timed = record["timed_caption"]
  if not isinstance(timed, list) or not timed:
    raise common.BadRecord("no timed utterances")
  utterances = []
  for item in timed:
    text = item.get("utterance") if isinstance(item, dict) else None
    if not isinstance(text, str):
      raise common.BadRecord("malformed utterance", repr(item)[:80])
    try:
      utterances.append(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # lone surrogates from a bad JSON escape
      raise common.BadRecord("non-UTF-8 utterance", repr(text[:40])) from e

  traces = record["traces"]
  if not isinstance(traces, list) or not all(isinstance(s, list) for s in traces):
    raise common.BadRecord("malformed trace", "traces is not a list of segments")
  if not any(traces):
    raise common.BadRecord("trace with no points")
  try:
    trace_Tx3 = trace_lib.trace_array(traces)
    boxes_Ux4, points_Ux2 = trace_lib.utterance_boxes_and_points(trace_Tx3, timed)
  except ValueError as e:
    raise common.BadRecord("malformed trace or utterance times", str(e)) from e
  times_Ux2 = np.array([[item["start_time"], item["end_time"]] for item in timed], np.float32)

  try:
    file_id: int | str = int(image_id) if image_id.isdigit() else image_id
    image_path = os.path.join(manual_dir, image_pattern.format(image_id=file_id))
  except (ValueError, KeyError, IndexError) as e:
    raise common.BadRecord("image_id does not fit the file-name pattern",
                           f"{image_id!r} vs {image_pattern!r}") from e
  image_bytes, _, _ = common.load_image(image_path)

  return f"{image_id}_{annotator_id}", {
      "image": image_bytes,
      "image_id": image_id,
      "annotator_id": annotator_id,
      "caption": caption,
      "utterances": utterances,
      "utterance_times": times_Ux2,
      "utterance_boxes": boxes_Ux4,
      "utterance_points": points_Ux2,
      "trace": trace_Tx3,
  }
