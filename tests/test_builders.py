"""tfds builders on tiny fixtures written in the official layouts (world configs)."""
import concurrent.futures
import io
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pixelllm_jax.data import trace
from pixelllm_jax.data.builders import common
from pixelllm_jax.data.builders import refer

SPLITS = ("train", "val", "test")


def _png(path, size=(20, 10), mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, 128).save(path)


def _points(*xyt):
  return [{"x": x, "y": y, "t": t} for x, y, t in xyt]


# ---------------------------------------------------------------- Localized Narratives

def _narrative(image_id, annotator_id, caption="a red square and a blue disc", traces=None):
  return {
      "dataset_id": "world", "image_id": str(image_id), "annotator_id": annotator_id,
      "caption": caption, "voice_recording": "none",
      "timed_caption": [{"utterance": "a red square", "start_time": 0.0, "end_time": 1.0},
                        {"utterance": "and a blue disc", "start_time": 1.0, "end_time": 2.0}],
      # Two segments, out of time order: x = t / 2, y = 0.5.
      "traces": traces if traces is not None else [
          _points((0.5, 0.5, 1.0), (1.0, 0.5, 2.0)), _points((0.0, 0.5, 0.0), (0.25, 0.5, 0.5))],
  }


@pytest.fixture(scope="module")
def ln_builder(tmp_path_factory):
  root = tmp_path_factory.mktemp("ln")
  manual = root / "manual"
  _png(f"{manual}/images/world_train_000001.png")
  _png(f"{manual}/images/world_train_000002.png", size=(8, 6), mode="L")  # grey: re-encoded RGB
  (manual / "images" / "world_train_000005.png").write_bytes(b"not a png")
  lines = [json.dumps(_narrative(1, 0)), json.dumps(_narrative(1, 1)), json.dumps(_narrative(2, 0)),
           json.dumps(_narrative(1, 0)),                      # duplicate narrative
           json.dumps(_narrative(3, 0, traces=[[], []])),     # trace with no points
           json.dumps(_narrative(4, 0, caption="  ")),        # empty caption
           json.dumps(_narrative(99, 0)),                     # missing image
           json.dumps(_narrative(5, 0))]                      # corrupt image
  ln_dir = manual / "localized_narratives"
  ln_dir.mkdir()
  with open(ln_dir / "world_train_localized_narratives.jsonl", "wb") as f:
    f.write(b"\n".join(line.encode() for line in lines) + b"\n")
    f.write(b'{"caption": "caf\xe9"}\n')                       # non-UTF-8 line
  for i, split in enumerate(SPLITS[1:]):
    _png(f"{manual}/images/world_{split}_{10 + i:06d}.png")
    (ln_dir / f"world_{split}_localized_narratives.jsonl").write_text(json.dumps(_narrative(10 + i, 7)))
  return common.prepare("localized_narratives", "world", str(manual), str(root / "data"))


def test_ln_records(ln_builder):
  source = ln_builder.as_data_source("train")
  assert len(source) == 3
  records = {(r["image_id"], r["annotator_id"]): r for r in (source[i] for i in range(len(source)))}
  assert set(records) == {(b"1", 0), (b"1", 1), (b"2", 0)}
  r = records[(b"1", 0)]
  assert r["image"].shape == (10, 20, 3) and r["image"].dtype == np.uint8
  assert records[(b"2", 0)]["image"].shape == (6, 8, 3)
  assert r["caption"] == b"a red square and a blue disc"
  assert list(r["utterances"]) == [b"a red square", b"and a blue disc"]
  np.testing.assert_allclose(r["utterance_times"], [[0, 1], [1, 2]])
  np.testing.assert_allclose(r["trace"][:, 2], [0.0, 0.5, 1.0, 2.0])  # concatenated, time-sorted
  np.testing.assert_allclose(r["trace"][:, 0], [0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(r["utterance_boxes"], [[0, 0.5, 0.5, 0.5], [0.5, 0.5, 1, 0.5]], atol=1e-6)
  np.testing.assert_allclose(r["utterance_points"], [[0.25, 0.5], [0.75, 0.5]], atol=1e-6)
  boxes, points = trace.utterance_boxes_and_points(_narrative(1, 0)["traces"],
                                                   _narrative(1, 0)["timed_caption"])
  np.testing.assert_array_equal(r["utterance_boxes"], boxes)
  np.testing.assert_array_equal(r["utterance_points"], points)
  assert [len(ln_builder.as_data_source(s)) for s in SPLITS[1:]] == [1, 1]


def test_ln_skips_are_counted_and_stored(ln_builder):
  assert common.skipped_counts(ln_builder)["train"] == {
      "duplicate narrative": 1, "trace with no points": 1, "empty caption": 1,
      "missing image": 1, "corrupt image": 1, "non-UTF-8 line": 1}
  assert common.skipped_counts(ln_builder)["val"] == {}
  # Stored next to the data, readable without the builder code.
  reread = tfds.builder_from_directory(ln_builder.data_dir)
  assert reread.info.metadata["skipped"]["train"]["missing image"] == 1


def test_prepare_is_idempotent(ln_builder):
  again = common.prepare("localized_narratives", "world", "/nonexistent/manual",
                         os.path.dirname(os.path.dirname(os.path.dirname(ln_builder.data_dir))))
  assert len(again.as_data_source("train")) == 3


def _prepare_when_released(barrier, manual, data):
  barrier.wait()  # every process past its imports: the prepares start together
  return len(common.prepare("localized_narratives", "world", manual, data).as_data_source("train"))


def test_concurrent_prepares_share_one_data_dir(tmp_path):
  # Runs of a sweep started together on one fresh data dir: without the lock in `prepare`
  # each built its own copy and all but the first failed renaming it into place.
  manual = tmp_path / "manual"
  (manual / "localized_narratives").mkdir(parents=True)
  for split, image_ids in (("train", (1, 2, 3)), ("val", (4,)), ("test", (5,))):
    for image_id in image_ids:
      _png(f"{manual}/images/world_{split}_{image_id:06d}.png")
    (manual / "localized_narratives" / f"world_{split}_localized_narratives.jsonl").write_text(
        "".join(json.dumps(_narrative(i, 0)) + "\n" for i in image_ids))
  context = multiprocessing.get_context("spawn")
  barrier = context.Manager().Barrier(3)
  with concurrent.futures.ProcessPoolExecutor(3, mp_context=context) as pool:
    sizes = list(pool.map(_prepare_when_released, [barrier] * 3, [str(manual)] * 3,
                          [str(tmp_path / "data")] * 3))
  assert sizes == [3, 3, 3]
  versions = os.listdir(tmp_path / "data" / "localized_narratives" / "world")
  assert versions == ["1.0.0"]  # one finished copy, no incomplete.* left behind


def test_ln_missing_files_listed_in_one_error(tmp_path):
  _png(f"{tmp_path}/manual/images/world_train_000001.png")
  with pytest.raises(FileNotFoundError) as info:
    common.prepare("localized_narratives", "world", str(tmp_path / "manual"), str(tmp_path / "data"))
  message = str(info.value)
  for split in SPLITS:
    assert f"MISSING {tmp_path}/manual/localized_narratives/world_{split}_localized_narratives.jsonl" in message
  assert f"found   {tmp_path}/manual/images" in message


# ---------------------------------------------------------------- refer

def _rect(x0, y0, x1, y1):
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(ann_id, image_id, bbox, polygons, category=1):
  return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox,
          "segmentation": polygons, "area": 0.0, "iscrowd": 0}


def _ref(ref_id, ann_id, image_id, split, sentences):
  sents = [{"sent_id": s, "sent": text, "raw": text, "tokens": text.split()} for s, text in sentences]
  return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
          "sentences": sents, "sent_ids": [s for s, _ in sentences], "file_name": "unused.png"}


def _write_refer(manual, refs):
  world = manual / "refer" / "world"
  world.mkdir(parents=True)
  images = []
  for image_id, size in ((1, (20, 10)), (2, (16, 16)), (3, (8, 8))):
    _png(f"{manual}/images/world_{image_id:06d}.png", size)
    images.append({"id": image_id, "file_name": f"world_{image_id:06d}.png",
                   "width": size[0], "height": size[1]})
  annotations = [
      _ann(10, 1, [2, 2, 3, 3], [_rect(2, 2, 5, 5)]),                                  # 9 px
      _ann(11, 1, [10, 0, 10, 10], [_rect(10, 0, 12, 2), _rect(15, 5, 20, 10)], 2),    # 4 + 25 px
      _ann(12, 1, [0, 0, 0, 5], [_rect(0, 0, 1, 5)]),                                  # zero width
      _ann(20, 2, [0, 0, 16, 16], [[0, 0, 16, 0, 0, 16]]),                             # triangle
      _ann(30, 3, [0, 0, 4, 4], [_rect(0, 0, 4, 4)]),
  ]
  (world / "instances.json").write_text(json.dumps(
      {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}))
  with open(world / "refs(umd).p", "wb") as f:
    pickle.dump(refs, f)


@pytest.fixture(scope="module")
def refer_builder(tmp_path_factory):
  root = tmp_path_factory.mktemp("refer")
  refs = [
      _ref(100, 10, 1, "train", [(1000, "left square"), (1001, "small square")]),
      _ref(101, 11, 1, "train", [(1002, "the two right pieces"), (1003, "   ")]),
      _ref(102, 10, 1, "train", [(1004, "the left square again")]),
      _ref(103, 12, 1, "train", [(1005, "a zero width box")]),
      _ref(104, 20, 2, "val", [(1006, "the triangle")]),
      _ref(105, 30, 3, "test", [(1007, "the only square")]),
      _ref(100, 30, 3, "test", [(1008, "duplicate ref id")]),
  ]
  _write_refer(root / "manual", refs)
  return common.prepare("refer", "world", str(root / "manual"), str(root / "data"))


def test_refer_records(refer_builder):
  source = tfds.data_source("refer/world", data_dir=os.path.dirname(
      os.path.dirname(os.path.dirname(refer_builder.data_dir))))
  assert [len(source[s]) for s in SPLITS] == [1, 1, 1]
  r = source["train"][0]
  assert r["image_id"] == 1 and r["image"].shape == (10, 20, 3)
  objects, expressions = r["objects"], r["expressions"]
  np.testing.assert_array_equal(objects["id"], [10, 11])
  np.testing.assert_array_equal(objects["category"], [1, 2])
  np.testing.assert_allclose(np.asarray(objects["box"]),
                             [[0.1, 0.2, 0.25, 0.5], [0.5, 0.0, 1.0, 1.0]], atol=1e-6)
  masks = np.asarray(objects["mask"])
  assert masks.shape == (2, 10, 20, 1) and set(np.unique(masks)) <= {0, 1}
  assert masks[0].sum() == 9 and masks[0, 2:5, 2:5, 0].all()
  assert masks[1].sum() == 29
  np.testing.assert_array_equal(expressions["ref_id"], [100, 100, 101, 102])
  np.testing.assert_array_equal(expressions["sent_id"], [1000, 1001, 1002, 1004])
  np.testing.assert_array_equal(expressions["object_index"], [0, 0, 1, 0])
  assert list(expressions["text"]) == [b"left square", b"small square", b"the two right pieces",
                                       b"the left square again"]
  triangle = np.asarray(source["val"][0]["objects"]["mask"])[0, ..., 0]
  assert triangle.sum() == 15 * 16 // 2  # centers with x + y < 16; the hypotenuse is a right edge
  assert triangle[0, :15].all() and triangle[0, 15] == 0 and triangle[15, 0] == 0


def test_refer_skips(refer_builder):
  skipped = common.skipped_counts(refer_builder)
  assert skipped["index"] == {"duplicate ref id": 1}
  assert skipped["train"] == {"empty expression": 1, "box with non-positive size": 1}


def test_refer_refuses_code_in_the_pickle(tmp_path):
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  _write_refer(tmp_path / "manual", [Payload()])
  with pytest.raises(ValueError, match=r"refs\(umd\)\.p: refused") as info:
    common.prepare("refer", "world", str(tmp_path / "manual"), str(tmp_path / "data"))
  assert "system" in str(info.value)
  assert not marker.exists()


def test_refer_missing_files_listed_in_one_error(tmp_path):
  _png(f"{tmp_path}/manual/images/world_000001.png")
  with pytest.raises(FileNotFoundError) as info:
    common.prepare("refer", "world", str(tmp_path / "manual"), str(tmp_path / "data"))
  message = str(info.value)
  assert "2 of 3 expected files are missing" in message
  assert f"MISSING {tmp_path}/manual/refer/world/instances.json" in message
  assert f"MISSING {tmp_path}/manual/refer/world/refs(umd).p" in message


def test_refer_rle_segmentation_is_decoded():
  # More RLE cases (both forms, malformed ones) in tests/test_builders_real.py.
  ann = _ann(40, 1, [0, 0, 2, 2], {"size": [10, 20], "counts": [0, 2, 8, 2, 188]})
  mask = np.asarray(Image.open(io.BytesIO(refer._object(ann, 20, 10)["mask"])))
  assert mask.shape == (10, 20) and mask.sum() == 4 and mask[:2, :2].all()


# ---------------------------------------------------------------- VG dense captioning

@pytest.fixture(scope="module")
def vg_builder(tmp_path_factory):
  root = tmp_path_factory.mktemp("vg")
  manual = root / "manual"
  (manual / "vg").mkdir(parents=True)
  _png(f"{manual}/images/vg_1.png")
  _png(f"{manual}/images/vg_2.png")
  images = [{"id": i, "file_name": f"vg_{i}.png", "width": 20, "height": 10} for i in (1, 2, 3)]
  annotations = [
      {"id": 1, "image_id": 1, "bbox": [2, 1, 4, 3], "caption": "a red square"},
      {"id": 2, "image_id": 1, "bbox": [0, 0, -1, 3], "caption": "negative width"},
      {"id": 3, "image_id": 1, "bbox": [15, 5, 10, 5], "caption": "past the right edge"},
      {"id": 4, "image_id": 1, "bbox": [0, 0, 2, 2], "caption": ""},
      {"id": 1, "image_id": 1, "bbox": [0, 0, 2, 2], "caption": "duplicate id"},
      {"id": 5, "image_id": 1, "bbox": [19.5, 0, 1, 10], "caption": "rounding overshoot"},
      {"id": 6, "image_id": 3, "bbox": [0, 0, 2, 2], "caption": "image file missing"},
  ]
  (manual / "vg" / "train.json").write_text(json.dumps({"images": images, "annotations": annotations}))
  for split in SPLITS[1:]:
    (manual / "vg" / f"{split}.json").write_text(json.dumps({
        "images": images[:1], "annotations": [annotations[0]]}))
  return common.prepare("vg_densecap", "world", str(manual), str(root / "data"))


def test_vg_records_and_skips(vg_builder):
  source = vg_builder.as_data_source("train")
  assert len(source) == 1
  r = source[0]
  assert r["image_id"] == 1 and r["image"].shape == (10, 20, 3)
  np.testing.assert_array_equal(r["regions"]["id"], [1, 5])
  np.testing.assert_allclose(np.asarray(r["regions"]["box"]),
                             [[0.1, 0.1, 0.3, 0.4], [0.975, 0.0, 1.0, 1.0]], atol=1e-6)
  assert list(r["regions"]["phrase"]) == [b"a red square", b"rounding overshoot"]
  assert common.skipped_counts(vg_builder)["train"] == {
      "box with non-positive size": 1, "box outside the image": 1, "empty caption": 1,
      "duplicate annotation id": 1, "image without valid regions": 1, "missing image": 1}
  assert [len(vg_builder.as_data_source(s)) for s in SPLITS[1:]] == [1, 1]


def test_box_conversion():
  np.testing.assert_allclose(common.xywh_to_normalized_xyxy([5, 2, 10, 4], 20, 8),
                             [0.25, 0.25, 0.75, 0.75])
  for box, reason in (([0, 0, 0, 1], "non-positive"), ([-2, 0, 1, 1], "outside"),
                      ([20.5, 0, 0.4, 1], "outside"), ([0, 0, 1], "malformed"), ([0, 0, float("nan"), 1], "malformed")):
    with pytest.raises(common.BadRecord, match=reason):
      common.xywh_to_normalized_xyxy(box, 20, 8)


def test_unknown_builder_name():
  with pytest.raises(ValueError, match="unknown builder"):
    common.prepare("coco", "world", "/tmp", "/tmp")


def _ln_world(manual, narratives):
  (manual / "localized_narratives").mkdir(parents=True, exist_ok=True)
  for split, image_ids in (("train", (1, 2)), ("val", (4,)), ("test", (5,))):
    for image_id in image_ids:
      _png(f"{manual}/images/world_{split}_{image_id:06d}.png")
    rows = narratives if split == "train" else [_narrative(i, 0) for i in image_ids]
    (manual / "localized_narratives" / f"world_{split}_localized_narratives.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))


def test_a_changed_source_is_prepared_again_never_served_stale(tmp_path, capsys):
  manual, data = tmp_path / "manual", str(tmp_path / "data")
  _ln_world(manual, [_narrative(1, 0), _narrative(2, 0)])
  first = common.prepare("localized_narratives", "world", str(manual), data)
  assert len(first.as_data_source("train")) == 2
  stored = json.load(open(os.path.join(first.data_dir, common.SOURCES_FILE)))
  assert "localized_narratives/world_train_localized_narratives.jsonl" in stored["files"]
  assert "images" in stored["files"]
  # The annotation file is edited after preparation: one narrative more, another caption.
  (manual / "localized_narratives" / "world_train_localized_narratives.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in [_narrative(1, 0, caption="a green disc"),
                                             _narrative(2, 0), _narrative(2, 1)]))
  capsys.readouterr()
  again = common.prepare("localized_narratives", "world", str(manual), data)
  out = capsys.readouterr().out
  assert "sources changed since it was prepared: " \
         "localized_narratives/world_train_localized_narratives.jsonl (changed)" in out
  source = again.as_data_source("train")
  assert len(source) == 3
  assert b"a green disc" in {source[i]["caption"] for i in range(len(source))}
  # Unchanged sources: reused as they are.
  capsys.readouterr()
  common.prepare("localized_narratives", "world", str(manual), data)
  assert "preparing it again" not in capsys.readouterr().out
  # Prepared data on a host without the manual dir: served, with a note.
  moved = common.prepare("localized_narratives", "world", str(tmp_path / "elsewhere"), data)
  assert len(moved.as_data_source("train")) == 3
  assert "unchecked" in capsys.readouterr().out
