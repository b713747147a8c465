"""tfds builder for Visual Genome dense captioning (GRiT-style JSON) -> array_record.

Each split is one COCO-style JSON: `images` [{id, file_name, width, height}],
`annotations` [{id, image_id, bbox [x, y, w, h] pixels, caption}]. One record
per image with its regions, boxes normalized to xyxy in [0, 1] (see
docs/DATA_FORMATS.md). Images without a valid region are skipped (counted):
a dense-captioning record with no target teaches nothing.
"""
import collections
import dataclasses
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from pixelllm_jax.data.builders import common


@dataclasses.dataclass(eq=False)
class VgDensecapConfig(tfds.core.BuilderConfig):
  """`annotation_pattern` (formatted with `split`) and `image_dir` are relative to the manual dir."""
  annotation_pattern: str = ""
  image_dir: str = "images"
  splits: tuple[str, ...] = ()


class VgDensecap(common.ManualDataBuilder):
  """Visual Genome region captions for dense captioning."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put GRiT's VG dense-captioning JSONs (train.json, test.json) in the config's
  annotation folder and the Visual Genome images in its image_dir.
  """
  BUILDER_CONFIGS = [
      VgDensecapConfig(name="world", description="The generated grounded world.",
                       annotation_pattern="vg/{split}.json", image_dir="images",
                       splits=("train", "val", "test")),
      VgDensecapConfig(name="grit", description="GRiT's VG dense-captioning split.",
                       annotation_pattern="vg/annotations/{split}.json", image_dir="vg/images",
                       splits=("train", "test")),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_id": np.int64,
        "regions": tfds.features.Sequence({
            "id": np.int64,
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "phrase": tfds.features.Text(),
        }),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features,
        homepage="https://homes.cs.washington.edu/~ranjay/visualgenome/",
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    patterns = {split: cfg.annotation_pattern.format(split=split) for split in cfg.splits}
    found = common.check_files_exist(f"{self.name}/{cfg.name}", manual_dir,
                                     [*patterns.values(), cfg.image_dir])
    image_dir = os.path.join(manual_dir, cfg.image_dir)
    return {split: self._generate_examples(split, found[pattern][0], image_dir)
            for split, pattern in patterns.items()}

  def _generate_examples(self, split: str, path: str,
                         image_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
    skips = common.SkipCounter(f"{self.name}/{self.builder_config.name}", split)
    images, regions_by_image = _read_split(path, skips)
    for image_id, info in sorted(images.items()):
      try:
        example = _image_example(info, regions_by_image.get(image_id, []), image_dir, skips, path)
      except common.BadRecord as e:
        skips.skip(e, f"{path} image {image_id}")
        continue
      yield str(image_id), example
    common.record_skips(self.info, skips)


def _read_split(path: str, skips: common.SkipCounter
                ) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
  """Images by id and their annotations, duplicates and malformed entries skipped."""
  data = common.load_json(path)
  if not isinstance(data, dict) or not all(
      isinstance(data.get(k), list) for k in ("images", "annotations")):
    raise ValueError(f"{path}: expected a COCO object with 'images' and 'annotations' lists")
  images: dict[int, dict[str, Any]] = {}
  for i, info in enumerate(data["images"]):
    where = f"{path} images[{i}]"
    if not isinstance(info, dict) or not isinstance(info.get("id"), int):
      skips.skip(common.BadRecord("malformed image entry"), where)
    elif info["id"] in images:
      skips.skip(common.BadRecord("duplicate image id", str(info["id"])), where)
    else:
      images[info["id"]] = info
  regions: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
  seen: set[int] = set()
  for i, ann in enumerate(data["annotations"]):
    where = f"{path} annotations[{i}]"
    if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
      skips.skip(common.BadRecord("malformed annotation"), where)
    elif ann["id"] in seen:
      skips.skip(common.BadRecord("duplicate annotation id", str(ann["id"])), where)
    elif ann.get("image_id") not in images:
      skips.skip(common.BadRecord("annotation of an unknown image", repr(ann.get("image_id"))), where)
    else:
      seen.add(ann["id"])
      regions[ann["image_id"]].append(ann)
  return images, regions


def _image_example(info: dict[str, Any], anns: list[dict[str, Any]], image_dir: str,
                   skips: common.SkipCounter, path: str) -> dict[str, Any]:
  """One image's record; bad regions are skipped and counted."""
  if not isinstance(info.get("file_name"), str):
    raise common.BadRecord("malformed image entry", "no file_name")
  image_bytes, width, height = common.load_image(os.path.join(image_dir, info["file_name"]))
  if (info.get("width"), info.get("height")) != (width, height):
    raise common.BadRecord("image size differs from the json",
                           f"file {width}x{height}, json {info.get('width')}x{info.get('height')}")
  regions = []
  for ann in anns:
    try:
      box = common.xywh_to_normalized_xyxy(ann.get("bbox"), width, height)
      phrase = common.clean_text(ann.get("caption"), "caption")
    except common.BadRecord as e:
      skips.skip(e, f"{path} annotation {ann['id']}")
      continue
    regions.append({"id": ann["id"], "box": box, "phrase": phrase})
  if not regions:
    raise common.BadRecord("image without valid regions")
  return {"image": image_bytes, "image_id": info["id"], "regions": regions}
