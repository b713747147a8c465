"""Tests of the generated grounded world: scenes, language, files on disk."""
import filecmp
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pixelllm_jax.data.world import generate, language, scene as scene_lib

CONFIG = scene_lib.WorldConfig()
SIZE = CONFIG.image_size


def _scenes(count: int, offset: int = 0):
  for i in range(offset, offset + count):
    rng = np.random.default_rng([123, i])
    yield scene_lib.sample_scene(rng, CONFIG), rng


# ---------------------------------------------------------------- scenes


def test_same_seed_same_scene_and_image():
  a, b = (scene_lib.sample_scene(np.random.default_rng(7), CONFIG) for _ in range(2))
  assert [o.attributes for o in a.objects] == [o.attributes for o in b.objects]
  assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
  np.testing.assert_array_equal(scene_lib.render(a, np.random.default_rng(1)),
                                scene_lib.render(b, np.random.default_rng(1)))


def test_scene_rules():
  counts = set()
  for scene, _ in _scenes(200):
    objects = scene.objects
    counts.add(len(objects))
    assert CONFIG.min_objects <= len(objects) <= CONFIG.max_objects
    assert len({o.attributes for o in objects}) == len(objects)  # no two share all three
    full = [scene_lib.shape_mask(o.shape, o.size, o.center_xy, SIZE) for o in objects]
    for i, obj in enumerate(objects):
      # Every object has a distractor sharing its shape or its colour.
      assert any(o.shape == obj.shape or o.colour == obj.colour for o in objects if o is not obj)
      rows, cols = np.nonzero(full[i])
      assert obj.box_xyxy == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
      assert obj.box_xyxy[0] >= 1 and obj.box_xyxy[1] >= 1
      assert obj.box_xyxy[2] <= SIZE - 1 and obj.box_xyxy[3] <= SIZE - 1
      later = np.logical_or.reduce(full[i + 1:]) if i + 1 < len(objects) else np.zeros_like(full[i])
      np.testing.assert_array_equal(obj.mask, full[i] & ~later)
      assert obj.mask.sum() >= 0.75 * full[i].sum()
  assert counts == {2, 3, 4, 5}


def test_object_sizes_follow_image_size():
  extents = {"small": [], "big": []}
  for scene, _ in _scenes(100):
    for o in scene.objects:
      x0, y0, x1, y1 = o.box_xyxy
      extents[o.size].append(max(x1 - x0, y1 - y0))
  assert 12 <= min(extents["small"]) and max(extents["small"]) <= 14
  assert 22 <= min(extents["big"]) and max(extents["big"]) <= 26


def test_masks_match_rendered_pixels():
  """Nearest-palette classification of the rendered image gives back the masks exactly."""
  palette = np.asarray(list(scene_lib.COLOURS.values()), np.float64)
  names = list(scene_lib.COLOURS)
  for scene, rng in _scenes(50):
    image = scene_lib.render(scene, rng).astype(np.float64)
    distance = np.linalg.norm(image[:, :, None, :] - palette[None, None], axis=-1)
    label = np.where(distance.min(-1) < 60, distance.argmin(-1), -1)
    for k, name in enumerate(names):
      union = np.zeros((SIZE, SIZE), bool)
      for o in scene.objects:
        if o.colour == name:
          union |= o.mask
      np.testing.assert_array_equal(label == k, union)


def test_polygon_rasterizes_to_mask():
  """COCO rasterization (pixel centre inside the polygon) gives back the mask exactly."""
  from pycocotools import mask as coco_mask
  from pixelllm_jax.data.builders import refer
  for scene, _ in _scenes(100):
    for o in scene.objects:
      polygon = scene_lib.mask_outline(o.mask)
      raster = refer.polygons_to_mask([polygon], SIZE, SIZE).astype(bool).reshape(SIZE, SIZE)
      np.testing.assert_array_equal(raster, o.mask)
      rle = coco_mask.frPyObjects([polygon], SIZE, SIZE)
      np.testing.assert_array_equal(coco_mask.decode(rle)[..., 0].astype(bool), o.mask)


def test_outline_rejects_holes():
  ring = np.zeros((8, 8), bool)
  ring[1:6, 1:6] = True
  ring[3, 3] = False
  with pytest.raises(ValueError):
    scene_lib.mask_outline(ring)


# ---------------------------------------------------------------- language

_SIZES, _COLOURS, _SHAPES = set(scene_lib.SIZES), set(scene_lib.COLOURS), set(scene_lib.SHAPES)
_DIRECTIONS = {"on the left": "left", "on the right": "right", "at the top": "top",
               "at the bottom": "bottom"}
_RELATIONS = ("left of", "right of", "above", "below")


def _parse_noun_phrase(words):
  attrs = {}
  for w in words:
    if w in _SIZES:
      attrs["size"] = w
    elif w in _COLOURS:
      attrs["colour"] = w
    elif w in _SHAPES:
      attrs["shape"] = w
    else:
      assert w == "one", words
  return attrs


def _evaluate(text: str, scene, threshold: float) -> tuple[list[int], int]:
  """An independent reading of an expression: (matching object indices, number of cues)."""
  centre = {o.index: ((o.box_xyxy[0] + o.box_xyxy[2]) / 2 / SIZE,
                      (o.box_xyxy[1] + o.box_xyxy[3]) / 2 / SIZE) for o in scene.objects}

  def matching(attrs):
    return [o.index for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]

  for phrase, direction in _DIRECTIONS.items():
    if text.endswith(phrase):
      attrs = _parse_noun_phrase(text[:-len(phrase)].split())
      axis, sign = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}[direction]
      ranked = sorted(matching(attrs), key=lambda i: -sign * centre[i][axis])
      if len(ranked) > 1 and sign * (centre[ranked[0]][axis] - centre[ranked[1]][axis]) <= threshold:
        return ranked, len(attrs) + 1
      return ranked[:1], len(attrs) + 1
  for relation in _RELATIONS:
    if f" {relation} the " in text:
      head, tail = text.split(f" {relation} the ")
      landmarks = matching(_parse_noun_phrase(tail.split()))
      assert len(landmarks) == 1, text
      lx, ly = centre[landmarks[0]]
      attrs = _parse_noun_phrase(head.split())
      delta = {"left of": lambda x, y: lx - x, "right of": lambda x, y: x - lx,
               "above": lambda x, y: ly - y, "below": lambda x, y: y - ly}[relation]
      return [i for i in matching(attrs) if i != landmarks[0] and delta(*centre[i]) > threshold], \
          len(attrs) + 1
  attrs = _parse_noun_phrase(text.split())
  return matching(attrs), len(attrs)


def test_referring_expressions_are_unambiguous():
  seen_spatial = 0
  for scene, rng in _scenes(200):
    expressions = language.referring_expressions(scene, rng)
    per_object = {o.index: 0 for o in scene.objects}
    for e in expressions:
      per_object[e.object_index] += 1
      matches, cues = _evaluate(e.text, scene, threshold=0.75 * language.MARGIN)
      assert matches == [e.object_index], (e.text, [o.phrase for o in scene.objects])
      assert cues >= 2, e.text
      assert language.referents(scene, e.description) == [e.object_index]
      seen_spatial += e.description.direction is not None or e.description.relation is not None
    assert all(1 <= n <= 2 for n in per_object.values())
  assert seen_spatial > 200  # spatial expressions are common, not a corner case


def test_caption_and_region_phrases():
  scene, _ = next(_scenes(1))
  objects = language.left_to_right(scene)
  caption = language.caption(scene)
  assert caption.startswith(f"a {objects[0].phrase}") and caption.endswith(f" and a {objects[-1].phrase}")
  assert language.region_phrases(scene) == [f"{o.size} {o.colour} {o.shape}" for o in scene.objects]


def test_narratives_are_short_timed_and_pointed():
  inside, outside_image, total_points = [], 0, 0
  for scene, rng in _scenes(200):
    narrative = language.narrate(scene, rng)
    words = narrative.timed_caption
    assert len(words) <= language.MAX_NARRATIVE_WORDS
    assert narrative.caption == " ".join(w["utterance"] for w in words)
    assert len(narrative.utterance_objects) == len(words)
    starts = np.array([w["start_time"] for w in words])
    ends = np.array([w["end_time"] for w in words])
    assert np.all(starts < ends) and np.all(ends[:-1] < starts[1:])
    named = {i for i in narrative.utterance_objects if i >= 0}
    assert named == {o.index for o in scene.objects}  # every object is mentioned
    for w, i in zip(words, narrative.utterance_objects):
      if i >= 0:
        assert w["utterance"] in scene.objects[i].attributes
    points = [p for segment in narrative.traces for p in segment]
    times = np.array([p["t"] for p in points])
    assert np.all(np.diff(times) > 0)
    assert times[0] <= starts[0] and times[-1] >= ends[-1]  # the trace covers the speech
    xy = np.array([[p["x"], p["y"]] for p in points])
    total_points += len(xy)
    outside_image += int(np.sum(np.any((xy < 0) | (xy > 1), axis=1)))
    for w, i in zip(words, narrative.utterance_objects):
      if i < 0:
        continue
      x0, y0, x1, y1 = np.asarray(scene.objects[i].box_xyxy) / SIZE
      during = (times >= w["start_time"]) & (times <= w["end_time"])
      inside += list((xy[during, 0] >= x0) & (xy[during, 0] <= x1)
                     & (xy[during, 1] >= y0) & (xy[during, 1] <= y1))
  assert len(inside) > 1000 and np.mean(inside) >= 0.95
  assert 0 < outside_image < 0.01 * total_points  # rare strays, as in real traces


def _named_order(narrative) -> list[int]:
  return list(dict.fromkeys(i for i in narrative.utterance_objects if i >= 0))


@pytest.mark.parametrize("order", language.NARRATIVE_ORDERS)
def test_narrative_order(order):
  """left_to_right names objects by box centre; random names each once, in varied orders."""
  seen_other_order = 0
  for scene, rng in _scenes(100):
    named = _named_order(language.narrate(scene, rng, order))
    assert sorted(named) == [o.index for o in scene.objects]
    seen_other_order += named != [o.index for o in language.left_to_right(scene)]
  if order == "left_to_right":
    assert seen_other_order == 0
  else:
    assert seen_other_order > 50  # 2-5 objects: a random order is rarely left to right


def test_unknown_narrative_order_is_an_error():
  scene, rng = next(_scenes(1))
  with pytest.raises(ValueError, match="narrative order"):
    language.narrate(scene, rng, "by_size")


# ---------------------------------------------------------------- files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("world"))
  result = generate.generate_world(out, num_train=6, num_val=2, num_test=2, seed=3)
  return out, result


def test_generation_is_deterministic(world, tmp_path):
  out, _ = world
  generate.generate_world(str(tmp_path), num_train=6, num_val=2, num_test=2, seed=3)
  compared = 0
  for root, _, files in os.walk(out):
    for name in files:
      path = os.path.join(root, name)
      other = os.path.join(tmp_path, os.path.relpath(path, out))
      assert filecmp.cmp(path, other, shallow=False), path
      compared += 1
  assert compared == 10 + 3 + 3 + 3 + 2 + 1  # images, LN, VG, scenes, refer, spiece


def test_files_have_the_official_layout(world):
  out, result = world
  assert result["counts"]["train"]["images"] == 6
  ln_keys = {"dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces",
             "voice_recording"}
  scenes = {}
  for split, num in (("train", 6), ("val", 2), ("test", 2)):
    with open(os.path.join(out, "localized_narratives", f"world_{split}_localized_narratives.jsonl")) as f:
      narratives = [json.loads(line) for line in f]
    assert len(narratives) == num
    for n in narratives:
      assert set(n) == ln_keys and isinstance(n["image_id"], str)
      assert all(set(u) == {"utterance", "start_time", "end_time"} for u in n["timed_caption"])
      assert all(set(p) == {"x", "y", "t"} for segment in n["traces"] for p in segment)
    with open(os.path.join(out, "scenes", f"{split}.jsonl")) as f:
      for line in f:
        row = json.loads(line)
        assert set(row) == {"image_id", "file_name", "width", "height", "objects", "utterance_objects"}
        assert all(set(o) == {"id", "shape", "colour", "size", "box_xyxy"} for o in row["objects"])
        ids = {o["id"] for o in row["objects"]}
        assert set(row["utterance_objects"]) - {-1} == ids
        scenes[row["image_id"]] = row
        with Image.open(os.path.join(out, "images", row["file_name"])) as image:
          assert image.mode == "RGB" and image.size == (row["width"], row["height"])
    with open(os.path.join(out, "vg", f"{split}.json")) as f:
      vg = json.load(f)
    assert set(vg) == {"images", "annotations"}
    assert all(set(i) == {"id", "file_name", "width", "height"} for i in vg["images"])
    assert all(set(a) == {"id", "image_id", "bbox", "caption"} for a in vg["annotations"])
  assert sorted(scenes) == list(range(1, 11))
  with open(os.path.join(out, "refer", "world", "instances.json")) as f:
    instances = json.load(f)
  assert set(instances) == {"images", "annotations", "categories"}
  annotations = {a["id"]: a for a in instances["annotations"]}
  for a in annotations.values():
    assert set(a) == {"id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd"}
    x0, y0, x1, y1 = next(o["box_xyxy"] for o in scenes[a["image_id"]]["objects"] if o["id"] == a["id"])
    assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
    assert len(a["segmentation"]) == 1 and len(a["segmentation"][0]) % 2 == 0
  assert [c["name"] for c in instances["categories"]] == list(scene_lib.SHAPES)
  with open(os.path.join(out, "refer", "world", "refs(umd).p"), "rb") as f:
    refs = pickle.load(f)
  assert {r["split"] for r in refs} == {"train", "val", "test"}
  assert len(refs) == len(annotations)  # one ref per object
  for r in refs:
    assert set(r) == {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences", "sent_ids",
                      "file_name"}
    assert annotations[r["ann_id"]]["image_id"] == r["image_id"]
    assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
    assert all(s["tokens"] == s["sent"].split() for s in r["sentences"])


def test_refs_pickle_holds_plain_data_only(world):
  out, _ = world

  class PlainOnly(pickle.Unpickler):
    def find_class(self, module, name):
      raise pickle.UnpicklingError(f"global {module}.{name}")

  with open(os.path.join(out, "refer", "world", "refs(umd).p"), "rb") as f:
    assert PlainOnly(f).load()
