"""tfds builder for RefCOCO / RefCOCO+ / RefCOCOg -> array_record (`refer` records).

Two official layouts, one record schema (docs/DATA_FORMATS.md "Builder
records"): one record per (split, COCO image) with the referred objects and
every expression of them.

- "refer" layout (github.com/lichengunc/refer): `<dir>/refs(<split_by>).p` (a
  pickled list of refs, loaded with a restricted unpickler: a data file never
  runs code) and `<dir>/instances.json` (COCO images / annotations). Splits
  come from the refs' `split` field. Read in `refer_layout.py`.
- MDETR layout (`final_<dataset>_<split>.json`, one COCO image entry per
  expression, regrouped here by `original_img_id`). Read in `mdetr_refer.py`.

Configs (paths relative to the manual dir; COCO train2014 images in
`coco/train2014/COCO_train2014_{id:012d}.jpg`, as `file_name` names them):

  world             refer/world/{instances.json, refs(umd).p}, images/      train/val/test
  refcoco_unc       refer/refcoco/{instances.json, refs(unc).p}             train/val/testA/testB
  refcoco_google    refer/refcoco/{instances.json, refs(google).p}          train/val/test
  refcocoplus_unc   refer/refcoco+/{instances.json, refs(unc).p}            train/val/testA/testB
  refcocog_umd      refer/refcocog/{instances.json, refs(umd).p}            train/val/test
  refcocog_google   refer/refcocog/{instances.json, refs(google).p}         train/val
  refcoco_mixed     the three unc/unc/umd sets above, split `train` only
  mdetr_refcoco     mdetr_annotations/final_refcoco_{train,val,testA,testB}.json
  mdetr_refcocoplus mdetr_annotations/final_refcoco+_{train,val,testA,testB}.json
  mdetr_refcocog    mdetr_annotations/final_refcocog_{train,val,test}.json
  mdetr_mixed       the three MDETR sets above, split `train` only

The `*_mixed` configs are the combined referring training set: the train
splits of RefCOCO, RefCOCO+ and RefCOCOg together, minus every image that
appears in any val/test split of any of the three (counted as "image in a
held-out split"). An image's expressions from the three sets share one record;
their `ref_id`/`sent_id` become `source * 10**9 + id` (source 0 RefCOCO,
1 RefCOCO+, 2 RefCOCOg) so they stay unique. The google splits are not mixed:
they partition objects, not images.

Choices:
- `objects` holds the referred annotations only (in order of first ref);
  objects whose every expression was skipped are left out.
- The expression text is the refer toolkit's normalized `sent` (MDETR:
  `caption`).
- Masks: `masks.segmentation_to_mask` (polygons, compressed and uncompressed
  RLE), values 0/1.
- Bad refs, objects, expressions and images are skipped and counted per split
  (the pickle's own problems under split "index").
"""
import dataclasses
import io
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pixelllm_jax.data.builders import common
from pixelllm_jax.data.builders import mdetr_refer
from pixelllm_jax.data.builders import refer_layout
from pixelllm_jax.data.builders.masks import polygons_to_mask, rle_to_mask, segmentation_to_mask  # noqa: F401  (re-exported)
from pixelllm_jax.data.builders.refer_layout import ReferImage

SOURCE_ID_STRIDE = 10**9  # mixed configs: ref_id / sent_id = source * stride + id
_UNC = ("train", "val", "testA", "testB")
_UMD = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ReferSource:
  """One annotation set. Refer layout: `dataset_dir` + `split_by`; MDETR:
  `mdetr_pattern` (a JSON path formatted with `split`). `splits` it holds."""
  dataset_dir: str = ""
  split_by: str = ""
  mdetr_pattern: str = ""
  splits: tuple[str, ...] = ()

  def files(self) -> list[str]:
    if self.mdetr_pattern:
      return [self.mdetr_pattern.format(split=s) for s in self.splits]
    return [f"{self.dataset_dir}/instances.json", f"{self.dataset_dir}/refs({self.split_by}).p"]


@dataclasses.dataclass(eq=False)
class ReferConfig(tfds.core.BuilderConfig):
  """`sources` and `image_dir` are relative to the manual dir. `splits` are the
  output splits; with `mixed`, every source's other splits are held out."""
  sources: tuple[ReferSource, ...] = ()
  splits: tuple[str, ...] = ()
  image_dir: str = "coco/train2014"
  mixed: bool = False
  coco_instances: str = "coco/annotations/instances_train2014.json"  # optional, MDETR masks


def _refer(name: str, dataset: str, split_by: str, splits: tuple[str, ...]) -> ReferConfig:
  return ReferConfig(name=name, description=f"{dataset} ({split_by} splits), refer layout.",
                     sources=(ReferSource(f"refer/{dataset}", split_by, splits=splits),),
                     splits=splits)


def _mdetr(name: str, dataset: str, splits: tuple[str, ...]) -> ReferConfig:
  return ReferConfig(name=name, description=f"{dataset}, MDETR layout.",
                     sources=(ReferSource(mdetr_pattern=f"mdetr_annotations/final_{dataset}_{{split}}.json",
                                          splits=splits),), splits=splits)


_SETS = (("refcoco", "unc", _UNC), ("refcoco+", "unc", _UNC), ("refcocog", "umd", _UMD))


class Refer(common.ManualDataBuilder):
  """Referring expressions (RefCOCO / RefCOCO+ / RefCOCOg; refer or MDETR layout)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "RLE masks, google splits, MDETR layout, mixed train sets."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Refer layout: unzip refcoco.zip, refcoco+.zip, refcocog.zip (lichengunc/refer)
  into <manual>/refer/ (refer/refcoco/refs(unc).p, refer/refcoco/instances.json,
  ...). MDETR layout: unpack mdetr_annotations.tar.gz into
  <manual>/mdetr_annotations/. COCO train2014 images in <manual>/coco/train2014/.
  """
  BUILDER_CONFIGS = [
      ReferConfig(name="world", description="The generated grounded world.",
                  sources=(ReferSource("refer/world", "umd", splits=_UMD),), splits=_UMD,
                  image_dir="images"),
      _refer("refcoco_unc", "refcoco", "unc", _UNC),
      _refer("refcoco_google", "refcoco", "google", _UMD),
      _refer("refcocoplus_unc", "refcoco+", "unc", _UNC),
      _refer("refcocog_umd", "refcocog", "umd", _UMD),
      _refer("refcocog_google", "refcocog", "google", ("train", "val")),
      ReferConfig(name="refcoco_mixed", description="RefCOCO/+/g train minus all val/test images.",
                  sources=tuple(ReferSource(f"refer/{d}", s, splits=sp) for d, s, sp in _SETS),
                  splits=("train",), mixed=True),
      _mdetr("mdetr_refcoco", "refcoco", _UNC),
      _mdetr("mdetr_refcocoplus", "refcoco+", _UNC),
      _mdetr("mdetr_refcocog", "refcocog", _UMD),
      ReferConfig(name="mdetr_mixed", description="MDETR RefCOCO/+/g train minus all val/test images.",
                  sources=tuple(ReferSource(mdetr_pattern=f"mdetr_annotations/final_{d}_{{split}}.json",
                                            splits=sp) for d, _, sp in _SETS),
                  splits=("train",), mixed=True),
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
    files = [f for source in cfg.sources for f in source.files()]
    found = common.check_files_exist(name, manual_dir, [*dict.fromkeys(files), cfg.image_dir])
    index_skips = common.SkipCounter(name, "index")
    skips = {split: common.SkipCounter(name, split) for split in cfg.splits}
    segmentations = mdetr_refer.CocoSegmentations(os.path.join(manual_dir, cfg.coco_instances))
    offsets = [i * SOURCE_ID_STRIDE if len(cfg.sources) > 1 else 0 for i in range(len(cfg.sources))]
    tables: list[dict[str, dict[int, ReferImage]]] = []
    for source, offset in zip(cfg.sources, offsets):
      if source.mdetr_pattern:
        tables.append({s: mdetr_refer.read_split(found[source.mdetr_pattern.format(split=s)][0],
                                                 offset, segmentations,
                                                 skips.get(s, index_skips))
                       for s in source.splits})
      else:
        tables.append(refer_layout.read_source(
            found[f"{source.dataset_dir}/instances.json"][0],
            found[f"{source.dataset_dir}/refs({source.split_by}).p"][0],
            source.splits, offset, index_skips))
    common.record_skips(self.info, index_skips)
    image_dir = os.path.join(manual_dir, cfg.image_dir)
    return {split: self._generate_examples(split, _merge(tables, split, cfg, skips[split]),
                                           image_dir, skips[split])
            for split in cfg.splits}

  def _generate_examples(self, split: str, images: dict[int, ReferImage], image_dir: str,
                         skips: common.SkipCounter) -> Iterator[tuple[str, dict[str, Any]]]:
    num_yielded = 0
    for image_id, image in sorted(images.items()):
      try:
        example = _image_example(image_id, image, image_dir, skips)
      except common.BadRecord as e:
        skips.skip(e, f"image {image_id}")
        continue
      num_yielded += 1
      yield str(image_id), example
    common.record_skips(self.info, skips)
    common.check_yielded(skips, num_yielded)


def _merge(tables: list[dict[str, dict[int, ReferImage]]], split: str, cfg: ReferConfig,
           skips: common.SkipCounter) -> dict[int, ReferImage]:
  """`split`'s images over all sources; mixed: minus images of held-out splits."""
  held_out: set[int] = set()
  if cfg.mixed:
    held_out = {image_id for table in tables for s, images in table.items()
                if s not in cfg.splits for image_id in images}
  merged: dict[int, ReferImage] = {}
  for table in tables:
    for image_id, image in table.get(split, {}).items():
      if image_id in held_out:
        continue
      if image_id not in merged:
        merged[image_id] = ReferImage(image.info, [])
      elif merged[image_id].info is None:
        merged[image_id].info = image.info
      merged[image_id].expressions.extend(image.expressions)
  dropped = {i for table in tables for i in table.get(split, {}) if i in held_out}
  for image_id in sorted(dropped):
    skips.skip(common.BadRecord("image in a held-out split", "a val/test split holds it"),
               f"image {image_id}")
  return merged


def _image_example(image_id: int, image: ReferImage, image_dir: str,
                   skips: common.SkipCounter) -> dict[str, Any]:
  """One image's record; bad objects/expressions are skipped and counted."""
  info = image.info
  if info is None or not isinstance(info.get("file_name"), str):
    raise common.BadRecord("image not in instances.json", str(image_id))
  image_bytes, width, height = common.load_image(os.path.join(image_dir, info["file_name"]))
  if (info.get("width"), info.get("height")) != (width, height):
    raise common.BadRecord("image size differs from the annotations",
                           f"file {width}x{height}, json {info.get('width')}x{info.get('height')}")

  objects: list[dict[str, Any]] = []
  object_index: dict[int, int] = {}
  built: dict[int, dict[str, Any] | common.BadRecord] = {}
  expressions: list[dict[str, Any]] = []
  seen_sent_ids: set[int] = set()
  for expr in sorted(image.expressions, key=lambda e: e.ref_id):
    try:
      if expr.error is not None:
        raise expr.error
      ann = expr.ann
      if ann["id"] not in built:
        try:
          built[ann["id"]] = _object(ann, width, height)
        except common.BadRecord as e:
          built[ann["id"]] = e
      if isinstance(built[ann["id"]], common.BadRecord):
        raise built[ann["id"]]
      if not isinstance(expr.sent_id, int):
        raise common.BadRecord("malformed sentence", repr(expr.sent_id)[:80])
      if expr.sent_id in seen_sent_ids:
        raise common.BadRecord("duplicate sent id", str(expr.sent_id))
      text = common.clean_text(expr.text, "expression")
    except common.BadRecord as e:
      skips.skip(e, f"{expr.where} (image {image_id})")
      continue
    seen_sent_ids.add(expr.sent_id)
    if ann["id"] not in object_index:
      object_index[ann["id"]] = len(objects)
      objects.append(built[ann["id"]])
    expressions.append({"ref_id": expr.ref_id, "sent_id": expr.sent_id,
                        "object_index": object_index[ann["id"]], "text": text})
  if not expressions:
    raise common.BadRecord("no valid expressions")
  return {"image": image_bytes, "image_id": image_id, "objects": objects, "expressions": expressions}


def _object(ann: dict[str, Any], width: int, height: int) -> dict[str, Any]:
  box = common.xywh_to_normalized_xyxy(ann.get("bbox"), width, height)
  if not isinstance(ann.get("category_id"), int):
    raise common.BadRecord("malformed category_id", repr(ann.get("category_id")))
  if ann.get("segmentation") is None:
    raise common.BadRecord("annotation without segmentation", f"annotation {ann['id']}")
  mask_HxW = segmentation_to_mask(ann["segmentation"], width, height)
  png = io.BytesIO()
  Image.fromarray(mask_HxW).save(png, format="PNG")
  return {"id": ann["id"], "box": box, "category": ann["category_id"], "mask": png.getvalue()}
