"""Reads raw Visual Genome region descriptions with DenseCap's split file.

Returns per split the same (images, regions by image) tables the GRiT reader
of `vg_densecap.py` makes: images {id: {id, file_name (relative to the VG
folder), width, height}}, regions {image id: [{id, bbox [x, y, w, h], caption}]}.
See `vg_densecap.py` for the files and the choices.
"""
import collections
import os
from typing import Any

from pixelllm_jax.data.builders import common


def _int(value: Any) -> int | None:
  return value if isinstance(value, int) and not isinstance(value, bool) else None


def _split_of_images(path: str, splits: tuple[str, ...],
                     skips: dict[str, common.SkipCounter]) -> dict[int, str]:
  data = common.load_json(path)
  if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in splits):
    raise ValueError(f"{path}: expected an object with image-id lists {list(splits)}")
  splits_of: dict[int, set[str]] = collections.defaultdict(set)
  for split in splits:
    for i, image_id in enumerate(data[split]):
      if _int(image_id) is None:
        skips[split].skip(common.BadRecord("malformed image id in the split file"), f"{path} {split}[{i}]")
      else:
        splits_of[image_id].add(split)
  split_of: dict[int, str] = {}
  for image_id, in_splits in sorted(splits_of.items()):
    if len(in_splits) == 1:
      split_of[image_id] = next(iter(in_splits))
      continue
    for split in sorted(in_splits):
      skips[split].skip(common.BadRecord("image in two splits", str(image_id)), path)
  return split_of


def _file_name(entry: dict[str, Any], image_id: int, image_dir: str, folders: tuple[str, ...]) -> str:
  """VG_100K[_2]/{id}.jpg: the url's folder, else the folder holding the file."""
  url = entry.get("url")
  if isinstance(url, str):
    folder = url.rstrip("/").split("/")[-2] if url.count("/") >= 1 else ""
    if folder in folders:
      return f"{folder}/{image_id}.jpg"
  for folder in folders:
    if os.path.exists(os.path.join(image_dir, folder, f"{image_id}.jpg")):
      return f"{folder}/{image_id}.jpg"
  return f"{folders[0]}/{image_id}.jpg"  # missing: counted when the image is read


def read(region_path: str, image_data_path: str, split_path: str, splits: tuple[str, ...],
         image_dir: str, folders: tuple[str, ...], skips: dict[str, common.SkipCounter]):
  """{split: (images, regions by image)} for the images the split file lists."""
  split_of = _split_of_images(split_path, splits, skips)
  image_data = common.load_json(image_data_path)
  if not isinstance(image_data, list):
    raise ValueError(f"{image_data_path}: expected a list of image entries")
  tables: dict[str, tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]] = {
      s: ({}, {}) for s in splits}
  for i, entry in enumerate(image_data):
    image_id = _int(entry.get("image_id", entry.get("id"))) if isinstance(entry, dict) else None
    split = split_of.get(image_id)
    if split is None:
      continue
    images = tables[split][0]
    where = f"{image_data_path}[{i}]"
    if image_id in images:
      skips[split].skip(common.BadRecord("duplicate image id", str(image_id)), where)
      continue
    images[image_id] = {"id": image_id, "width": entry.get("width"), "height": entry.get("height"),
                        "file_name": _file_name(entry, image_id, image_dir, folders)}
  for image_id, split in sorted(split_of.items()):
    if image_id not in tables[split][0]:
      skips[split].skip(common.BadRecord("image not in image_data.json", str(image_id)), image_data_path)

  descriptions = common.load_json(region_path)
  if not isinstance(descriptions, list):
    raise ValueError(f"{region_path}: expected a list of {{id, regions}} entries")
  seen_images: set[int] = set()
  seen_regions: set[int] = set()
  for i, entry in enumerate(descriptions):
    image_id = _int(entry.get("id", entry.get("image_id"))) if isinstance(entry, dict) else None
    split = split_of.get(image_id)
    if split is None or image_id not in tables[split][0]:
      continue
    where = f"{region_path}[{i}]"
    if image_id in seen_images:
      skips[split].skip(common.BadRecord("duplicate image id", str(image_id)), where)
      continue
    seen_images.add(image_id)
    regions = entry.get("regions")
    if not isinstance(regions, list):
      skips[split].skip(common.BadRecord("malformed region list"), where)
      continue
    out = tables[split][1].setdefault(image_id, [])
    for j, region in enumerate(regions):
      region_where = f"{where}.regions[{j}]"
      region_id = _int(region.get("region_id", region.get("id"))) if isinstance(region, dict) else None
      if region_id is None:
        skips[split].skip(common.BadRecord("malformed region"), region_where)
      elif region_id in seen_regions:
        skips[split].skip(common.BadRecord("duplicate region id", str(region_id)), region_where)
      elif region.get("image_id", image_id) != image_id:
        skips[split].skip(common.BadRecord("region of another image", repr(region.get("image_id"))),
                          region_where)
      else:
        seen_regions.add(region_id)
        out.append({"id": region_id, "caption": region.get("phrase"),
                    "bbox": [region.get(k) for k in ("x", "y", "width", "height")]})
  return tables
