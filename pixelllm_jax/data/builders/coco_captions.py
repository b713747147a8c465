"""tfds builder for image captions in Karpathy's split files -> array_record.

Record (one per image): `image` uint8[H, W, 3], `image_id` int, `caption`
list of bytes (every valid sentence's `raw` text, stripped), which the
`caption` task reads as is.

Karpathy's `caption_datasets.zip` holds one JSON per dataset: {"images":
[{filepath (COCO only: train2014 / val2014), filename, imgid, split (train /
restval / val / test), sentids, sentences [{raw, tokens, imgid, sentid}],
cocoid (COCO only)}], "dataset": ...}. Configs (paths relative to the manual dir):

  karpathy            karpathy/dataset_coco.json; images coco/{filepath}/{filename}
                      (coco/train2014/, coco/val2014/); image_id = cocoid
  flickr30k_karpathy  karpathy/dataset_flickr30k.json; images
                      flickr30k/flickr30k-images/{filename}; image_id = the
                      file name's number

Splits train (Karpathy's train + restval, the usual 113k), val, test (5k each
for COCO). Skipped and counted: malformed entries, unknown split names,
duplicate image ids, empty / non-UTF-8 sentences (per sentence), images with
no valid sentence, missing or corrupt images.
"""
import dataclasses
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from pixelllm_jax.data.builders import common

_SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclasses.dataclass(eq=False)
class CocoCaptionsConfig(tfds.core.BuilderConfig):
  """`annotation_file` and `image_dir` relative to the manual dir. `id_key`
  names the image id field; empty: the number in the file name."""
  annotation_file: str = ""
  image_dir: str = ""
  image_folders: tuple[str, ...] = ()  # checked to exist inside image_dir
  id_key: str = ""


class CocoCaptions(common.ManualDataBuilder):
  """Captions per image, Karpathy splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Unzip Karpathy's caption_datasets.zip into <manual>/karpathy/ and put the COCO
  2014 images in <manual>/coco/train2014/ and <manual>/coco/val2014/
  (Flickr30k: <manual>/flickr30k/flickr30k-images/).
  """
  BUILDER_CONFIGS = [
      CocoCaptionsConfig(name="karpathy", description="COCO captions, Karpathy splits.",
                         annotation_file="karpathy/dataset_coco.json", image_dir="coco",
                         image_folders=("train2014", "val2014"), id_key="cocoid"),
      CocoCaptionsConfig(name="flickr30k_karpathy", description="Flickr30k, Karpathy splits.",
                         annotation_file="karpathy/dataset_flickr30k.json",
                         image_dir="flickr30k/flickr30k-images"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_id": np.int64,
        "caption": tfds.features.Sequence(tfds.features.Text()),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features,
        homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    name = f"{self.name}/{cfg.name}"
    folders = [f"{cfg.image_dir}/{f}" for f in cfg.image_folders] or [cfg.image_dir]
    found = common.check_files_exist(name, manual_dir, [cfg.annotation_file, *folders])
    path = found[cfg.annotation_file][0]
    skips = {split: common.SkipCounter(name, split) for split in ("train", "val", "test")}
    index_skips = common.SkipCounter(name, "index")
    by_split = _read(path, cfg.id_key, skips, index_skips)
    common.record_skips(self.info, index_skips)
    image_dir = os.path.join(manual_dir, cfg.image_dir)
    return {split: self._generate_examples(by_split[split], path, image_dir, skips[split])
            for split in skips}

  def _generate_examples(self, entries: list[tuple[int, dict[str, Any], str]], path: str,
                         image_dir: str, skips: common.SkipCounter
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    num_yielded = 0
    for image_id, entry, where in entries:
      try:
        example = _example(image_id, entry, image_dir, skips, where)
      except common.BadRecord as e:
        skips.skip(e, where)
        continue
      num_yielded += 1
      yield str(image_id), example
    common.record_skips(self.info, skips)
    common.check_yielded(skips, num_yielded)


def _image_id(entry: dict[str, Any], id_key: str) -> int:
  if id_key:
    value = entry.get(id_key)
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise common.BadRecord("malformed image entry", f"{id_key} {value!r}")
  stem = os.path.splitext(str(entry.get("filename", "")))[0]
  digits = stem.rsplit("_", 1)[-1]
  if not digits.isdigit():
    raise common.BadRecord("malformed image entry", f"no number in filename {entry.get('filename')!r}")
  return int(digits)


def _read(path: str, id_key: str, skips: dict[str, common.SkipCounter],
          index_skips: common.SkipCounter) -> dict[str, list[tuple[int, dict[str, Any], str]]]:
  """{split: [(image_id, entry, where)]} in file order; duplicates and bad splits counted."""
  data = common.load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"{path}: expected Karpathy's object with an 'images' list")
  out: dict[str, list[tuple[int, dict[str, Any], str]]] = {s: [] for s in skips}
  seen: set[int] = set()
  for i, entry in enumerate(data["images"]):
    where = f"{path} images[{i}]"
    try:
      if not isinstance(entry, dict):
        raise common.BadRecord("malformed image entry")
      if entry.get("split") not in _SPLIT_OF:
        raise common.BadRecord("unknown split", repr(entry.get("split")))
      image_id = _image_id(entry, id_key)
    except common.BadRecord as e:
      index_skips.skip(e, where)
      continue
    split = _SPLIT_OF[entry["split"]]
    if image_id in seen:
      skips[split].skip(common.BadRecord("duplicate image id", str(image_id)), where)
      continue
    seen.add(image_id)
    out[split].append((image_id, entry, f"{where} (image {image_id})"))
  return out


def _example(image_id: int, entry: dict[str, Any], image_dir: str, skips: common.SkipCounter,
             where: str) -> dict[str, Any]:
  filename = entry.get("filename")
  filepath = entry.get("filepath", "")
  if not isinstance(filename, str) or not isinstance(filepath, str) or "/" in filename or ".." in filepath:
    raise common.BadRecord("malformed image entry", f"filepath {filepath!r} filename {filename!r}")
  sentences = entry.get("sentences")
  if not isinstance(sentences, list):
    raise common.BadRecord("malformed image entry", "no sentences list")
  captions = []
  for j, sentence in enumerate(sentences):
    try:
      captions.append(common.clean_text(
          sentence.get("raw") if isinstance(sentence, dict) else None, "caption"))
    except common.BadRecord as e:
      skips.skip(e, f"{where} sentences[{j}]")
  if not captions:
    raise common.BadRecord("image without valid captions")
  image_bytes, _, _ = common.load_image(os.path.join(image_dir, filepath, filename))
  return {"image": image_bytes, "image_id": image_id, "caption": captions}
