"""Reads the lichengunc/refer layout (`refs(<split_by>).p` + `instances.json`).

Produces, per split, {image_id: ReferImage}: the image's COCO entry and its
expressions (one per sentence of each ref), each resolved to its COCO
annotation or carrying the reason it cannot be (counted when the record is
built, in the split's counter). Problems of the pickle itself (malformed or
duplicate refs, a split the config does not hold) are counted in `skips`
("index").
"""
import dataclasses
from typing import Any

from pixelllm_jax.data.builders import common


@dataclasses.dataclass
class Expression:
  ref_id: int
  sent_id: Any          # validated when the record is built
  ann: dict[str, Any] | None
  error: common.BadRecord | None
  text: Any             # validated when the record is built
  where: str


@dataclasses.dataclass
class ReferImage:
  info: dict[str, Any] | None  # COCO image entry: file_name, width, height
  expressions: list[Expression]


class Instances:
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


def read_source(instances_path: str, refs_path: str, splits: tuple[str, ...], offset: int,
                skips: common.SkipCounter) -> dict[str, dict[int, ReferImage]]:
  """{split: {image_id: ReferImage}}; ids shifted by `offset` (mixed configs)."""
  instances = Instances(instances_path, skips)
  refs = common.load_plain_pickle(refs_path)
  if not isinstance(refs, list):
    raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
  tables: dict[str, dict[int, ReferImage]] = {s: {} for s in splits}
  seen: set[int] = set()
  for i, ref in enumerate(refs):
    where = f"{refs_path} ref[{i}]"
    if not isinstance(ref, dict) or not all(
        isinstance(ref.get(k), int) for k in ("ref_id", "ann_id", "image_id")) or not isinstance(
            ref.get("sentences"), list):
      skips.skip(common.BadRecord("malformed ref"), where)
      continue
    if ref["ref_id"] in seen:
      skips.skip(common.BadRecord("duplicate ref id", str(ref["ref_id"])), where)
      continue
    if ref.get("split") not in tables:
      skips.skip(common.BadRecord("ref split not in config", repr(ref.get("split"))), where)
      continue
    if not ref["sentences"]:
      skips.skip(common.BadRecord("ref without sentences"), where)
      continue
    seen.add(ref["ref_id"])
    image_id = ref["image_id"]
    image = tables[ref["split"]].setdefault(image_id, ReferImage(instances.images.get(image_id), []))
    ann = instances.annotations.get(ref["ann_id"])
    error = None
    if ann is None:
      error = common.BadRecord("ref annotation not in instances.json", str(ref["ann_id"]))
    elif ann.get("image_id") != image_id:
      error = common.BadRecord("ref and annotation disagree on the image",
                               f"ann {ann['id']} is on image {ann.get('image_id')!r}")
    for sentence in ref["sentences"]:
      sent_id = sentence.get("sent_id") if isinstance(sentence, dict) else None
      text = sentence.get("sent") if isinstance(sentence, dict) else None
      if isinstance(sent_id, int):
        sent_id += offset
      image.expressions.append(Expression(ref["ref_id"] + offset, sent_id, ann, error, text,
                                          f"{refs_path} ref {ref['ref_id']}"))
  return {s: dict(images) for s, images in tables.items()}

