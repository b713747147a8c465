"""tfds builder for Visual Genome dense captioning -> array_record.

One record per image with its regions, boxes normalized to xyxy in [0, 1] (see
docs/DATA_FORMATS.md). Images without a valid region are skipped (counted):
a dense-captioning record with no target teaches nothing. Two layouts (paths
relative to the manual dir):

- `grit` (GRiT's split): `vg/annotations/{train,test}.json`, each COCO-style:
  `images` [{id, file_name, width, height}], `annotations` [{id, image_id,
  bbox [x, y, w, h] pixels, caption}]; images in `vg/images/`. (`world`: the
  same layout at `vg/{split}.json`, images in `images/`.)
- `densecap` (raw Visual Genome + Johnson et al.'s DenseCap split):
  `vg/region_descriptions.json` ([{id (image id; `image_id` also accepted),
  regions: [{region_id (or id), image_id, phrase, x, y, width, height}]}]),
  `vg/image_data.json` ([{image_id (or id), width, height, url}]; the url's
  folder, VG_100K or VG_100K_2, locates the file `{image_id}.jpg`, else both
  folders are tried), `vg/densecap_splits.json` ({"train": [ids], "val":
  [ids], "test": [ids]}), images in `vg/VG_100K/` and `vg/VG_100K_2/`. Only
  images the split file lists are read; DenseCap's own phrase-length filter
  is not applied. An image in two splits is skipped from both (counted).
"""
import collections
import dataclasses
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from pixelllm_jax.data.builders import common
from pixelllm_jax.data.builders import vg_raw


@dataclasses.dataclass(eq=False)
class VgDensecapConfig(tfds.core.BuilderConfig):
  """Paths relative to the manual dir. grit: `annotation_pattern` (formatted
  with `split`); densecap: the three raw files and `image_folders` (inside
  `image_dir`)."""
  annotation_pattern: str = ""
  image_dir: str = "images"
  splits: tuple[str, ...] = ()
  region_file: str = ""
  image_data_file: str = ""
  split_file: str = ""
  image_folders: tuple[str, ...] = ()


class VgDensecap(common.ManualDataBuilder):
  """Visual Genome region captions for dense captioning."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  grit: GRiT's VG JSONs as vg/annotations/{train,test}.json, images in vg/images/.
  densecap: vg/region_descriptions.json, vg/image_data.json,
  vg/densecap_splits.json, images in vg/VG_100K/ and vg/VG_100K_2/.
  """
  BUILDER_CONFIGS = [
      VgDensecapConfig(name="world", description="The generated grounded world.",
                       annotation_pattern="vg/{split}.json", image_dir="images",
                       splits=("train", "val", "test")),
      VgDensecapConfig(name="grit", description="GRiT's VG dense-captioning split.",
                       annotation_pattern="vg/annotations/{split}.json", image_dir="vg/images",
                       splits=("train", "test")),
      VgDensecapConfig(name="densecap", description="Raw VG regions, DenseCap splits.",
                       region_file="vg/region_descriptions.json",
                       image_data_file="vg/image_data.json", split_file="vg/densecap_splits.json",
                       image_dir="vg", image_folders=("VG_100K", "VG_100K_2"),
                       splits=("train", "val", "test")),
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
    name = f"{self.name}/{cfg.name}"
    image_dir = os.path.join(manual_dir, cfg.image_dir)
    if cfg.region_file:
      files = [cfg.region_file, cfg.image_data_file, cfg.split_file,
               *(f"{cfg.image_dir}/{d}" for d in cfg.image_folders)]
      found = common.check_files_exist(name, manual_dir, files)
      skips = {split: common.SkipCounter(name, split) for split in cfg.splits}
      tables = vg_raw.read(*(found[f][0] for f in files[:3]), cfg.splits, image_dir,
                           cfg.image_folders, skips)
      return {split: self._generate_examples(split, tables[split], found[cfg.region_file][0],
                                             image_dir, skips[split])
              for split in cfg.splits}
    patterns = {split: cfg.annotation_pattern.format(split=split) for split in cfg.splits}
    found = common.check_files_exist(name, manual_dir, [*patterns.values(), cfg.image_dir])
    return {split: self._generate_examples(split, found[pattern][0], found[pattern][0], image_dir,
                                           common.SkipCounter(name, split))
            for split, pattern in patterns.items()}

  def _generate_examples(self, split: str, table: Any, path: str, image_dir: str,
                         skips: common.SkipCounter) -> Iterator[tuple[str, dict[str, Any]]]:
    images, regions_by_image = _read_split(table, skips) if isinstance(table, str) else table
    num_yielded = 0
    for image_id, info in sorted(images.items()):
      try:
        example = _image_example(info, regions_by_image.get(image_id, []), image_dir, skips, path)
      except common.BadRecord as e:
        skips.skip(e, f"{path} image {image_id}")
        continue
      num_yielded += 1
      yield str(image_id), example
    common.record_skips(self.info, skips)
    common.check_yielded(skips, num_yielded)


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
