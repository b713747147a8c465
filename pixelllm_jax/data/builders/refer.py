"""tfds builder for RefCOCO-family data in the "refer" layout -> array_record.

Reads `<dataset_dir>/refs(<split_by>).p` (a pickled list of refs, loaded with
a restricted unpickler: a data file never runs code) and
`<dataset_dir>/instances.json` (COCO-style images / annotations). One record
per (split, image) with the referred objects and every expression of them;
splits come from the refs' `split` field. See docs/DATA_FORMATS.md.

Choices:
- `objects` holds the referred annotations only (in order of first ref);
  objects whose every expression was skipped are left out.
- The expression text is the refer toolkit's normalized `sent`.
- Masks are rasterized from the COCO polygons by sampling pixel centers
  (even-odd rule within a polygon, union across an object's polygons), as
  pycocotools does; PIL's `ImageDraw.polygon` fills a closed outline and
  grows every mask by about a pixel, so it is not used. Values are 0/1.
  RLE segmentations (crowd annotations) raise NotImplementedError.
"""
import collections
import dataclasses
import io
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pixelllm_jax.data.builders import common


@dataclasses.dataclass(eq=False)
class ReferConfig(tfds.core.BuilderConfig):
  """`dataset_dir` and `image_dir` are relative to the manual dir."""
  dataset_dir: str = ""
  split_by: str = ""
  splits: tuple[str, ...] = ()
  image_dir: str = "images"


class Refer(common.ManualDataBuilder):
  """Referring expressions (RefCOCO / RefCOCO+ / RefCOCOg, refer layout)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the refer toolkit data in the manual dir: <dataset_dir>/instances.json
  and <dataset_dir>/refs(<split_by>).p (e.g. refcoco/refs(unc).p), and the
  COCO train2014 images in the config's image_dir.
  """
  BUILDER_CONFIGS = [
      ReferConfig(name="world", description="The generated grounded world.",
                  dataset_dir="refer/world", split_by="umd", splits=("train", "val", "test"),
                  image_dir="images"),
      ReferConfig(name="refcoco_unc", dataset_dir="refcoco", split_by="unc",
                  splits=("train", "val", "testA", "testB"), image_dir="train2014"),
      ReferConfig(name="refcocoplus_unc", dataset_dir="refcoco+", split_by="unc",
                  splits=("train", "val", "testA", "testB"), image_dir="train2014"),
      ReferConfig(name="refcocog_umd", dataset_dir="refcocog", split_by="umd",
                  splits=("train", "val", "test"), image_dir="train2014"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64,
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "category": np.int64,
            "mask": tfds.features.Image(shape=(None, None, 1)),
        }),
        "expressions": tfds.features.Sequence({
            "ref_id": np.int64,
            "sent_id": np.int64,
            "object_index": np.int64,
            "text": tfds.features.Text(),
        }),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features,
        homepage="https://github.com/lichengunc/refer", metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    name = f"{self.name}/{cfg.name}"
    found = common.check_files_exist(name, manual_dir, [
        f"{cfg.dataset_dir}/instances.json", f"{cfg.dataset_dir}/refs({cfg.split_by}).p",
        cfg.image_dir])
    index_skips = common.SkipCounter(name, "index")
    instances = _Instances(found[f"{cfg.dataset_dir}/instances.json"][0], index_skips)
    refs_by_split = _group_refs(found[f"{cfg.dataset_dir}/refs({cfg.split_by}).p"][0],
                                cfg.splits, index_skips)
    common.record_skips(self.info, index_skips)
    image_dir = os.path.join(manual_dir, cfg.image_dir)
    return {split: self._generate_examples(split, refs_by_split[split], instances, image_dir)
            for split in cfg.splits}

  def _generate_examples(self, split: str, refs_by_image: dict[int, list[dict[str, Any]]],
                         instances: "_Instances", image_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
    skips = common.SkipCounter(f"{self.name}/{self.builder_config.name}", split)
    for image_id, refs in sorted(refs_by_image.items()):
      try:
        example = _image_example(image_id, refs, instances, image_dir, skips)
      except common.BadRecord as e:
        skips.skip(e, f"image {image_id}")
        continue
      yield str(image_id), example
    common.record_skips(self.info, skips)


class _Instances:
  """instances.json indexed by image id and annotation id (duplicates skipped)."""

  def __init__(self, path: str, skips: common.SkipCounter):
    self.path = path
    data = common.load_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")):
      raise ValueError(f"{path}: expected a COCO object with 'images' and 'annotations' lists")
    self.images = self._index(data["images"], "image", skips)
    self.annotations = self._index(data["annotations"], "annotation", skips)

  def _index(self, entries: list[Any], what: str, skips: common.SkipCounter) -> dict[int, dict[str, Any]]:
    index: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
      where = f"{self.path} {what}s[{i}]"
      if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
        skips.skip(common.BadRecord(f"malformed {what} entry"), where)
      elif entry["id"] in index:
        skips.skip(common.BadRecord(f"duplicate {what} id", str(entry["id"])), where)
      else:
        index[entry["id"]] = entry
    return index


def _group_refs(path: str, splits: tuple[str, ...],
                skips: common.SkipCounter) -> dict[str, dict[int, list[dict[str, Any]]]]:
  """{split: {image_id: [ref, ...]}} from the refs pickle; bad refs are skipped."""
  refs = common.load_plain_pickle(path)
  if not isinstance(refs, list):
    raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
  grouped: dict[str, dict[int, list[dict[str, Any]]]] = {s: collections.defaultdict(list) for s in splits}
  seen: set[int] = set()
  for i, ref in enumerate(refs):
    where = f"{path} ref[{i}]"
    if not isinstance(ref, dict) or not all(
        isinstance(ref.get(k), int) for k in ("ref_id", "ann_id", "image_id")) or not isinstance(
            ref.get("sentences"), list):
      skips.skip(common.BadRecord("malformed ref"), where)
    elif ref["ref_id"] in seen:
      skips.skip(common.BadRecord("duplicate ref id", str(ref["ref_id"])), where)
    elif ref.get("split") not in grouped:
      skips.skip(common.BadRecord("ref split not in config", repr(ref.get("split"))), where)
    else:
      seen.add(ref["ref_id"])
      grouped[ref["split"]][ref["image_id"]].append(ref)
  return {s: dict(by_image) for s, by_image in grouped.items()}


def _image_example(image_id: int, refs: list[dict[str, Any]], instances: _Instances,
                   image_dir: str, skips: common.SkipCounter) -> dict[str, Any]:
  """One image's record; bad objects/expressions are skipped and counted."""
  info = instances.images.get(image_id)
  if info is None or not isinstance(info.get("file_name"), str):
    raise common.BadRecord("image not in instances.json", str(image_id))
  image_bytes, width, height = common.load_image(os.path.join(image_dir, info["file_name"]))
  if (info.get("width"), info.get("height")) != (width, height):
    raise common.BadRecord("image size differs from instances.json",
                           f"file {width}x{height}, json {info.get('width')}x{info.get('height')}")

  objects: list[dict[str, Any]] = []
  object_index: dict[int, int] = {}
  expressions: list[dict[str, Any]] = []
  seen_sent_ids: set[int] = set()
  for ref in sorted(refs, key=lambda r: r["ref_id"]):
    where = f"image {image_id} ref {ref['ref_id']}"
    try:
      ann = instances.annotations.get(ref["ann_id"])
      if ann is None:
        raise common.BadRecord("ref annotation not in instances.json", str(ref["ann_id"]))
      if ann.get("image_id") != image_id:
        raise common.BadRecord("ref and annotation disagree on the image")
      obj = _object(ann, width, height) if ann["id"] not in object_index else None
    except common.BadRecord as e:
      skips.skip(e, where)
      continue
    new_expressions = []
    for sentence in ref["sentences"]:
      try:
        sent_id = sentence.get("sent_id") if isinstance(sentence, dict) else None
        if not isinstance(sent_id, int):
          raise common.BadRecord("malformed sentence", repr(sentence)[:80])
        if sent_id in seen_sent_ids:
          raise common.BadRecord("duplicate sent id", str(sent_id))
        text = common.clean_text(sentence.get("sent"), "expression")
      except common.BadRecord as e:
        skips.skip(e, where)
        continue
      seen_sent_ids.add(sent_id)
      new_expressions.append({"ref_id": ref["ref_id"], "sent_id": sent_id, "text": text})
    if not new_expressions:
      continue
    if obj is not None:
      object_index[ann["id"]] = len(objects)
      objects.append(obj)
    for expression in new_expressions:
      expression["object_index"] = object_index[ann["id"]]
    expressions.extend(new_expressions)
  if not expressions:
    raise common.BadRecord("no valid expressions")
  return {"image": image_bytes, "image_id": image_id, "objects": objects, "expressions": expressions}


def _object(ann: dict[str, Any], width: int, height: int) -> dict[str, Any]:
  box = common.xywh_to_normalized_xyxy(ann.get("bbox"), width, height)
  if not isinstance(ann.get("category_id"), int):
    raise common.BadRecord("malformed category_id", repr(ann.get("category_id")))
  segmentation = ann.get("segmentation")
  if isinstance(segmentation, dict):
    raise NotImplementedError(
        f"annotation {ann['id']}: RLE segmentations are not supported yet (only polygons)")
  mask_HxW = polygons_to_mask(segmentation, width, height)
  png = io.BytesIO()
  Image.fromarray(mask_HxW).save(png, format="PNG")
  return {"id": ann["id"], "box": box, "category": ann["category_id"],
          "mask": png.getvalue()}


def polygons_to_mask(polygons: Any, width: int, height: int) -> np.ndarray:
  """uint8[H, W] 0/1 mask of COCO polygons ([[x0, y0, x1, y1, ...], ...], pixels).

  A pixel is inside when its center is (even-odd rule per polygon, union over
  polygons); edges are half-open (left/top in, right/bottom out), so polygons
  that tile a region cover each pixel once. Raises BadRecord on a malformed or empty segmentation.
  """
  if not isinstance(polygons, list) or not polygons:
    raise common.BadRecord("malformed segmentation", repr(polygons)[:80])
  mask_HxW = np.zeros((height, width), bool)
  centers_y = np.arange(height) + 0.5
  centers_x = np.arange(width) + 0.5
  for polygon in polygons:
    try:
      xy_Px2 = np.asarray(polygon, np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as e:
      raise common.BadRecord("malformed segmentation", repr(polygon)[:80]) from e
    if len(xy_Px2) < 3 or len(polygon) % 2 or not np.all(np.isfinite(xy_Px2)):
      raise common.BadRecord("malformed segmentation", repr(polygon)[:80])
    x0, y0 = xy_Px2[:, 0], xy_Px2[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Edge e crosses the row through y when y lies in [min(y0, y1), max(y0, y1)).
    crosses_HxE = (y0 <= centers_y[:, None]) != (y1 <= centers_y[:, None])
    slope_E = np.divide(x1 - x0, y1 - y0, out=np.zeros_like(x0), where=y1 != y0)
    cross_x_HxE = x0 + (centers_y[:, None] - y0) * slope_E
    for row in np.flatnonzero(crosses_HxE.any(axis=1)):
      xs = np.sort(cross_x_HxE[row, crosses_HxE[row]])
      # Half-open like the rows: a center on a left edge is in, on a right edge out.
      inside_W = np.searchsorted(xs, centers_x, side="right") % 2 == 1
      mask_HxW[row] |= inside_W
  return mask_HxW.astype(np.uint8)
