"""tfds builder for Localized Narratives (official JSONL layout) -> array_record.

One record per narrative (an image has one per annotator); see
docs/DATA_FORMATS.md "Builder records". Per-utterance boxes and time-averaged
points are computed here with `pixelllm_jax.data.trace` (official
preprocessing), so the training pipeline only has to align them to tokens.

Configs: the LN JSONL files keep their official names in
`<manual>/localized_narratives/`; images stay in their datasets' own layouts.
The LN `image_id` names the image file:

  world        world_{train,val,test}_localized_narratives.jsonl;
               images/world_{split}_{id:06d}.png
  coco         coco_train_localized_narratives-0000[0-3]-of-00004.jsonl,
               coco_val_localized_narratives.jsonl;
               coco/train2017/{id:012d}.jpg, coco/val2017/{id:012d}.jpg (COCO 2017)
  open_images  open_images_train_v6_localized_narratives-0000[0-9]-of-00010.jsonl,
               open_images_validation_localized_narratives.jsonl,
               open_images_test_localized_narratives.jsonl;
               open_images/{train,validation,test}/{id}.jpg (id: 16 hex digits)
  flickr30k    flickr30k_{train,val,test}_localized_narratives.jsonl;
               flickr30k/flickr30k-images/{id}.jpg
  ade20k       ade20k_train_localized_narratives.jsonl,
               ade20k_validation_localized_narratives.jsonl;
               ade20k/ADEChallengeData2016/images/{training,validation}/{id}.jpg
               (id: ADE_train_00000001 / ADE_val_00000001)

Splits are named train / val / test whatever the file says.

Skipped and counted: non-UTF-8 or invalid JSON lines, missing fields, empty
or non-UTF-8 captions, malformed utterances, traces with no points or with a
point more than 0.5 outside [0, 1] (slightly outside is kept; trace.py clips),
missing or corrupt images, duplicate (image_id, annotator_id).
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
_FAR_OUTSIDE = 0.5  # a trace point further than this outside [0, 1] marks a broken trace
_LN = "localized_narratives"


@dataclasses.dataclass(eq=False)
class LocalizedNarrativesConfig(tfds.core.BuilderConfig):
  """Where one flavour of LN lives under the manual dir.

  `splits` holds (split name, JSONL path or tuple of shard paths, image path
  pattern), all relative to the manual dir; the pattern is formatted with
  `image_id` as the LN string, or as an int where the pattern asks for one
  (`{image_id:012d}`).
  """
  splits: tuple[tuple[str, str | tuple[str, ...], str], ...] = ()


def _shards(prefix: str, n: int) -> tuple[str, ...]:
  return tuple(f"{_LN}/{prefix}-{i:05d}-of-{n:05d}.jsonl" for i in range(n))


def _world_splits() -> tuple[tuple[str, str, str], ...]:
  return tuple((s, f"{_LN}/world_{s}_localized_narratives.jsonl",
                f"images/world_{s}_{{image_id:06d}}.png") for s in ("train", "val", "test"))


_OI = "open_images"
_ADE = "ade20k/ADEChallengeData2016/images"


class LocalizedNarratives(common.ManualDataBuilder):
  """Localized Narratives: caption, timed utterances, mouse trace per narrative."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the LN JSONL files and the source images in the manual dir, in the
  layout of the chosen config (see the module docstring), e.g. for `coco`:
  localized_narratives/coco_train_localized_narratives-0000?-of-00004.jsonl,
  localized_narratives/coco_val_localized_narratives.jsonl, coco/train2017/,
  coco/val2017/.
  """
  BUILDER_CONFIGS = [
      LocalizedNarrativesConfig(
          name="world", description="The generated grounded world.", splits=_world_splits()),
      LocalizedNarrativesConfig(
          name="coco", description="LN-COCO with COCO 2017 images.",
          splits=(("train", _shards("coco_train_localized_narratives", 4),
                   "coco/train2017/{image_id:012d}.jpg"),
                  ("val", f"{_LN}/coco_val_localized_narratives.jsonl",
                   "coco/val2017/{image_id:012d}.jpg"))),
      LocalizedNarrativesConfig(
          name="open_images", description="LN-Open Images (v6 train, validation, test).",
          splits=(("train", _shards("open_images_train_v6_localized_narratives", 10),
                   f"{_OI}/train/{{image_id}}.jpg"),
                  ("val", f"{_LN}/open_images_validation_localized_narratives.jsonl",
                   f"{_OI}/validation/{{image_id}}.jpg"),
                  ("test", f"{_LN}/open_images_test_localized_narratives.jsonl",
                   f"{_OI}/test/{{image_id}}.jpg"))),
      LocalizedNarrativesConfig(
          name="flickr30k", description="LN-Flickr30k.",
          splits=tuple((s, f"{_LN}/flickr30k_{s}_localized_narratives.jsonl",
                        "flickr30k/flickr30k-images/{image_id}.jpg")
                       for s in ("train", "val", "test"))),
      LocalizedNarrativesConfig(
          name="ade20k", description="LN-ADE20k (ADEChallengeData2016 images).",
          splits=(("train", f"{_LN}/ade20k_train_localized_narratives.jsonl",
                   f"{_ADE}/training/{{image_id}}.jpg"),
                  ("val", f"{_LN}/ade20k_validation_localized_narratives.jsonl",
                   f"{_ADE}/validation/{{image_id}}.jpg"))),
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
    splits = [(split, (jsonl,) if isinstance(jsonl, str) else tuple(jsonl), image_pattern)
              for split, jsonl, image_pattern in self.builder_config.splits]
    image_dirs = [os.path.dirname(image_pattern) for _, _, image_pattern in splits]
    found = common.check_files_exist(
        f"{self.name}/{self.builder_config.name}", manual_dir,
        [p for _, files, _ in splits for p in files] + [d for d in dict.fromkeys(image_dirs) if d])
    return {split: self._generate_examples(split, [path for p in files for path in found[p]],
                                           manual_dir, image_pattern)
            for split, files, image_pattern in splits}

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
    common.check_yielded(skips, len(seen))


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
  if not image_id or image_id in (".", "..") or "/" in image_id or "\\" in image_id:
    raise common.BadRecord("malformed image_id", repr(image_id)[:80])
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
    if np.any(np.abs(trace_Tx3[:, :2] - 0.5) > 0.5 + _FAR_OUTSIDE):
      raise common.BadRecord("trace far outside the image",
                             f"x in [{trace_Tx3[:, 0].min()}, {trace_Tx3[:, 0].max()}], "
                             f"y in [{trace_Tx3[:, 1].min()}, {trace_Tx3[:, 1].max()}]")
    boxes_Ux4, points_Ux2 = trace_lib.utterance_boxes_and_points(trace_Tx3, timed)
  except ValueError as e:
    raise common.BadRecord("malformed trace or utterance times", str(e)) from e
  times_Ux2 = np.array([[item["start_time"], item["end_time"]] for item in timed], np.float32)

  try:
    try:
      file_name = image_pattern.format(image_id=image_id)
    except ValueError:  # the pattern wants a number, e.g. {image_id:012d}
      if not image_id.isdigit():
        raise
      file_name = image_pattern.format(image_id=int(image_id))
    image_path = os.path.join(manual_dir, file_name)
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
