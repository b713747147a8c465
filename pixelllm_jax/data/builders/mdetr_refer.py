"""Reads MDETR's referring-expression JSONs (`final_refcoco_train.json`, ...).

MDETR stores one COCO "image" entry per expression: `images` [{id (the
expression), original_img_id (or original_id: the COCO image id), file_name,
height, width, caption, dataset_name, tokens_negative, tokens_positive_eval,
...}], `annotations` [{id, image_id (the expression entry's id), bbox
[x, y, w, h], category_id, original_id (the COCO annotation id, when present),
segmentation (in the "with mask" release), area, iscrowd, tokens_positive}].
The expressions are regrouped here by COCO image (as the official
`build_mdetr_ref_tfrecord.py` does) into `refer_layout.ReferImage`s.

Ids: an object's id is its annotation's `original_id` (else its `id`); MDETR has
no refs, so an expression's `ref_id` is its annotation's `id` and its `sent_id`
its image entry's `id`. An expression must have exactly one box.
Masks: from the annotation's `segmentation`; when a release has none, from
COCO's `instances_train2014.json` by `original_id` if that file is in the
manual dir (`CocoSegmentations`), else the object is skipped ("annotation
without segmentation").
"""
import collections
import os
from typing import Any

from pixelllm_jax.data.builders import common
from pixelllm_jax.data.builders.refer_layout import Expression, ReferImage


class CocoSegmentations:
  """COCO annotation id -> segmentation from an optional instances file (read on first use)."""

  def __init__(self, path: str):
    self.path = path
    self._by_id: dict[int, Any] | None = None

  def get(self, ann_id: int) -> Any:
    if self._by_id is None:
      self._by_id = {}
      if os.path.isfile(self.path):
        data = common.load_json(self.path)
        for ann in data.get("annotations", []) if isinstance(data, dict) else []:
          if isinstance(ann, dict) and isinstance(ann.get("id"), int):
            self._by_id[ann["id"]] = ann.get("segmentation")
    return self._by_id.get(ann_id)


def _as_int(value: Any) -> int | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  return None


def read_split(path: str, offset: int, segmentations: CocoSegmentations,
               skips: common.SkipCounter) -> dict[int, ReferImage]:
  """{COCO image id: ReferImage} of one MDETR split file; bad entries counted in `skips`."""
  data = common.load_json(path)
  if not isinstance(data, dict) or not all(
      isinstance(data.get(k), list) for k in ("images", "annotations")):
    raise ValueError(f"{path}: expected an MDETR COCO object with 'images' and 'annotations' lists")
  anns_by_entry: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
  seen_anns: set[int] = set()
  for i, ann in enumerate(data["annotations"]):
    where = f"{path} annotations[{i}]"
    if not isinstance(ann, dict) or _as_int(ann.get("id")) is None or _as_int(ann.get("image_id")) is None:
      skips.skip(common.BadRecord("malformed annotation"), where)
    elif ann["id"] in seen_anns:
      skips.skip(common.BadRecord("duplicate annotation id", str(ann["id"])), where)
    else:
      seen_anns.add(ann["id"])
      anns_by_entry[_as_int(ann["image_id"])].append(ann)

  images: dict[int, ReferImage] = {}
  seen_entries: set[int] = set()
  for i, entry in enumerate(data["images"]):
    where = f"{path} images[{i}]"
    try:
      if not isinstance(entry, dict) or _as_int(entry.get("id")) is None:
        raise common.BadRecord("malformed image entry")
      entry_id = _as_int(entry["id"])
      if entry_id in seen_entries:
        raise common.BadRecord("duplicate image entry id", str(entry_id))
      seen_entries.add(entry_id)
      image_id = _as_int(entry.get("original_img_id", entry.get("original_id")))
      width, height = _as_int(entry.get("width")), _as_int(entry.get("height"))
      if image_id is None or width is None or height is None or not isinstance(
          entry.get("file_name"), str):
        raise common.BadRecord("malformed image entry", "original_img_id/width/height/file_name")
      info = {"file_name": entry["file_name"], "width": width, "height": height}
      if image_id in images and images[image_id].info != info:
        raise common.BadRecord("entries of one image disagree", f"{info} vs {images[image_id].info}")
      anns = anns_by_entry.get(entry_id, [])
      if len(anns) != 1:
        raise common.BadRecord("expression without exactly one box", f"{len(anns)} boxes")
    except common.BadRecord as e:
      skips.skip(e, where)
      continue
    ann = anns[0]
    object_id = _as_int(ann.get("original_id", ann["id"]))
    segmentation = ann.get("segmentation")
    if segmentation is None and object_id is not None:
      segmentation = segmentations.get(object_id)
    error = None if object_id is not None else common.BadRecord("malformed annotation", "original_id")
    obj = {"id": object_id, "image_id": image_id, "bbox": ann.get("bbox"),
           "category_id": ann.get("category_id"), "segmentation": segmentation}
    image = images.setdefault(image_id, ReferImage(info, []))
    image.expressions.append(Expression(
        ref_id=_as_int(ann["id"]) + offset, sent_id=entry_id + offset, ann=obj, error=error,
        text=entry.get("caption"), where=where))
  return images
