"""Writes world scenes in the official dataset layouts (docs/DATA_FORMATS.md).

- Localized Narratives JSONL, one narrative per image (annotator 0).
- "refer" layout: `refs(umd).p` (protocol-4 pickle of plain dicts, lists,
  str and int only) plus COCO-style `instances.json` covering every split.
  One ref per object, holding its one or two expressions. A ref's
  `file_name` is the image file name (relative to D/images), as the COCO ids
  are shared. Category ids: 1 + index in `scene.SHAPES`.
- GRiT-style VG COCO JSON per split, one region per object.
- `scenes/{split}.jsonl`: ground truth for evaluation.

Ids: the COCO annotation id of an object is also its VG region id, its id in
`scenes/*.jsonl` and what `utterance_objects` refers to. Boxes (`bbox`
[x, y, w, h] and `box_xyxy`) are the tight box of the full shape in pixel
corner coordinates; `segmentation` is the outline of the visible pixels in
the pixel-centre convention and `area` is the visible pixel count (see
scene.py). Floats in JSON are rounded so files are byte-stable.
"""
import dataclasses
import io
import json
import os
import pickle

import numpy as np
from PIL import Image

from pixelllm_jax.data.world import language, scene as scene_lib


@dataclasses.dataclass(frozen=True)
class Annotated:
  """One generated image with everything the writers need."""
  split: str
  image_id: int
  scene: scene_lib.Scene
  narrative: language.Narrative
  expressions: list[language.Expression]
  first_ann_id: int                      # annotation id of object 0; objects follow consecutively

  @property
  def file_name(self) -> str:
    return f"world_{self.split}_{self.image_id:06d}.png"

  def ann_id(self, object_index: int) -> int:
    return self.first_ann_id + object_index


def _dump_json(obj, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, separators=(",", ":"))


def _write_jsonl(rows, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, separators=(",", ":")) + "\n")


def _xywh(box_xyxy) -> list[int]:
  x0, y0, x1, y1 = (int(v) for v in box_xyxy)
  return [x0, y0, x1 - x0, y1 - y0]


def _image_entry(item: Annotated) -> dict:
  size = item.scene.image_size
  return {"id": item.image_id, "file_name": item.file_name, "width": size, "height": size}


def write_image(image: np.ndarray, item: Annotated, out_dir: str) -> str:
  """Saves uint8[H, W, 3] `image` as item's PNG under D/images; returns its path."""
  path = os.path.join(out_dir, "images", item.file_name)
  buffer = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
  with open(path, "wb") as f:
    f.write(buffer.getvalue())
  return path


def narrative_row(item: Annotated) -> dict:
  return {
      "dataset_id": f"world_{item.split}",
      "image_id": str(item.image_id),
      "annotator_id": 0,
      "caption": item.narrative.caption,
      "timed_caption": item.narrative.timed_caption,
      "traces": item.narrative.traces,
      "voice_recording": f"world_{item.split}/world_{item.split}_{item.image_id:06d}_0.ogg",
  }


def scene_row(item: Annotated) -> dict:
  return {
      "image_id": item.image_id,
      "file_name": item.file_name,
      "width": item.scene.image_size,
      "height": item.scene.image_size,
      "objects": [{"id": item.ann_id(o.index), "shape": o.shape, "colour": o.colour, "size": o.size,
                   "box_xyxy": [int(v) for v in o.box_xyxy]} for o in item.scene.objects],
      "utterance_objects": [item.ann_id(i) if i >= 0 else -1 for i in item.narrative.utterance_objects],
  }


def write_split_files(items: list[Annotated], split: str, out_dir: str) -> dict[str, str]:
  """LN JSONL, VG JSON and scenes JSONL of one split; returns their paths."""
  ln_path = os.path.join(out_dir, "localized_narratives", f"world_{split}_localized_narratives.jsonl")
  _write_jsonl((narrative_row(item) for item in items), ln_path)
  vg_path = os.path.join(out_dir, "vg", f"{split}.json")
  annotations = [{"id": item.ann_id(o.index), "image_id": item.image_id, "bbox": _xywh(o.box_xyxy),
                  "caption": phrase}
                 for item in items
                 for o, phrase in zip(item.scene.objects, language.region_phrases(item.scene))]
  _dump_json({"images": [_image_entry(item) for item in items], "annotations": annotations}, vg_path)
  scenes_path = os.path.join(out_dir, "scenes", f"{split}.jsonl")
  _write_jsonl((scene_row(item) for item in items), scenes_path)
  return {"localized_narratives": ln_path, "vg": vg_path, "scenes": scenes_path}


def write_refer(items: list[Annotated], out_dir: str) -> dict[str, str]:
  """refs(umd).p and instances.json over all splits; returns their paths."""
  refer_dir = os.path.join(out_dir, "refer", "world")
  categories = [{"id": i + 1, "name": shape, "supercategory": "shape"}
                for i, shape in enumerate(scene_lib.SHAPES)]
  category_id = {shape: i + 1 for i, shape in enumerate(scene_lib.SHAPES)}
  annotations, refs = [], []
  sent_id = 0
  for item in items:
    for obj in item.scene.objects:
      ann_id = item.ann_id(obj.index)
      annotations.append({
          "id": ann_id, "image_id": item.image_id, "category_id": category_id[obj.shape],
          "bbox": _xywh(obj.box_xyxy), "segmentation": [scene_lib.mask_outline(obj.mask)],
          "area": int(obj.mask.sum()), "iscrowd": 0})
      sentences = []
      for expression in item.expressions:
        if expression.object_index == obj.index:
          sentences.append({"sent_id": sent_id, "sent": expression.text, "raw": expression.text,
                            "tokens": expression.text.split()})
          sent_id += 1
      refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": item.image_id,
                   "category_id": category_id[obj.shape], "split": item.split,
                   "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                   "file_name": item.file_name})
  instances_path = os.path.join(refer_dir, "instances.json")
  _dump_json({"images": [_image_entry(item) for item in items], "annotations": annotations,
              "categories": categories}, instances_path)
  refs_path = os.path.join(refer_dir, "refs(umd).p")
  with open(refs_path, "wb") as f:
    pickle.dump(refs, f, protocol=4)
  return {"refs": refs_path, "instances": instances_path}


def make_dirs(out_dir: str) -> None:
  for sub in ("images", "localized_narratives", os.path.join("refer", "world"), "vg", "scenes"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
