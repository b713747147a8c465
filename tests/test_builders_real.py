"""Builders on tiny fixtures written in the real datasets' official layouts.

File names, keys and folders as the real downloads have them (Localized
Narratives for COCO / Open Images / Flickr30k / ADE20k, RefCOCO/+/g in the
refer and MDETR layouts, raw Visual Genome with DenseCap splits, Karpathy's
COCO captions), edge cases included. Nothing is downloaded.
"""
import importlib
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_api

from pixelllm_jax.data.builders import common
from pixelllm_jax.data.builders import masks
from pixelllm_jax.data.builders import refer

W, H = 16, 12


def _jpg(path, size=(W, H)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (90, 120, 150)).save(path, format="JPEG")


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w" if isinstance(text, str) else "wb") as f:
    f.write(text)


def _records(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def _decode_png(data):
  return np.asarray(Image.open(io.BytesIO(data)))


# ---------------------------------------------------------------- Localized Narratives

def _narrative(image_id, annotator_id=0, caption="a dog on the grass", xs=(0.2, 0.4, 0.6)):
  return json.dumps({
      "dataset_id": "x", "image_id": image_id, "annotator_id": annotator_id, "caption": caption,
      "voice_recording": "x.ogg",
      "timed_caption": [{"utterance": "a dog", "start_time": 0.0, "end_time": 1.0},
                        {"utterance": "on the grass", "start_time": 1.0, "end_time": 2.0}],
      "traces": [[{"x": x, "y": 0.5, "t": float(i)} for i, x in enumerate(xs)]]})


@pytest.fixture(scope="module")
def ln(tmp_path_factory):
  root = tmp_path_factory.mktemp("ln_real")
  m = str(root / "manual")
  d = f"{m}/localized_narratives"
  # COCO: 4 train shards (some empty), ids -> coco/train2017/{id:012d}.jpg.
  for i in range(4):
    _write(f"{d}/coco_train_localized_narratives-{i:05d}-of-00004.jsonl", "")
  _jpg(f"{m}/coco/train2017/000000391895.jpg")
  _jpg(f"{m}/coco/train2017/000000000009.jpg")
  _jpg(f"{m}/coco/val2017/000000000139.jpg")
  _write(f"{m}/coco/train2017/000000000025.jpg", b"\xff\xd8 truncated jpeg")
  lines = [
      _narrative("391895"), _narrative("391895", 1),
      _narrative("9", xs=(-0.2, 0.5, 1.3)),          # slightly outside: kept, boxes clipped
      _narrative("391895"),                          # duplicate narrative
      _narrative("9", 2, xs=(0.2, 1.6, 0.4)),        # > 0.5 outside: skipped
      _narrative("9", 3, xs=()),                     # trace with no points
      _narrative("9", 4, caption=""),                # empty caption
      _narrative("9", 5, caption="\ud800"),          # lone surrogate: non-UTF-8 caption
      '{"image_id": "9", "caption": ',               # malformed JSON
      _narrative("77"),                              # missing image
      _narrative("25"),                              # corrupt image
      _narrative("../../etc/passwd"),                # not an id
  ]
  _write(f"{d}/coco_train_localized_narratives-00001-of-00004.jsonl", "\n".join(lines[:6]) + "\n")
  _write(f"{d}/coco_train_localized_narratives-00003-of-00004.jsonl",
         ("\n".join(lines[6:]) + "\n").encode() + b'{"caption": "caf\xe9"}\n')
  _write(f"{d}/coco_val_localized_narratives.jsonl", _narrative("139") + "\n")
  # Open Images: 10 train shards; ids are 16 hex digits, some all digits.
  for i in range(10):
    _write(f"{d}/open_images_train_v6_localized_narratives-{i:05d}-of-00010.jsonl", "")
  _write(f"{d}/open_images_train_v6_localized_narratives-00007-of-00010.jsonl",
         _narrative("0000b9fcba019d36") + "\n" + _narrative("0123456789012345") + "\n")
  _write(f"{d}/open_images_validation_localized_narratives.jsonl", _narrative("ffff0a1b2c3d4e5f"))
  _write(f"{d}/open_images_test_localized_narratives.jsonl", _narrative("abcd0a1b2c3d4e5f"))
  for split, image_id in (("train", "0000b9fcba019d36"), ("train", "0123456789012345"),
                          ("validation", "ffff0a1b2c3d4e5f"), ("test", "abcd0a1b2c3d4e5f")):
    _jpg(f"{m}/open_images/{split}/{image_id}.jpg")
  # Flickr30k and ADE20k.
  for split, image_id in (("train", "1000092795"), ("val", "1001"), ("test", "1002")):
    _write(f"{d}/flickr30k_{split}_localized_narratives.jsonl", _narrative(image_id))
    _jpg(f"{m}/flickr30k/flickr30k-images/{image_id}.jpg")
  for split, folder, image_id in (("train", "training", "ADE_train_00000001"),
                                  ("validation", "validation", "ADE_val_00000001")):
    _write(f"{d}/ade20k_{split}_localized_narratives.jsonl", _narrative(image_id))
    _jpg(f"{m}/ade20k/ADEChallengeData2016/images/{folder}/{image_id}.jpg")
  return {name: common.prepare("localized_narratives", name, m, str(root / "data"))
          for name in ("coco", "open_images", "flickr30k", "ade20k")}


def test_ln_configs_read_every_official_layout(ln):
  ids = {name: {split: sorted((r["image_id"], r["annotator_id"]) for r in _records(b, split))
                for split in b.info.splits}
         for name, b in ln.items()}
  assert ids["coco"] == {"train": [(b"391895", 0), (b"391895", 1), (b"9", 0)], "val": [(b"139", 0)]}
  assert ids["open_images"] == {"train": [(b"0000b9fcba019d36", 0), (b"0123456789012345", 0)],
                                "val": [(b"ffff0a1b2c3d4e5f", 0)], "test": [(b"abcd0a1b2c3d4e5f", 0)]}
  assert ids["flickr30k"] == {"train": [(b"1000092795", 0)], "val": [(b"1001", 0)],
                              "test": [(b"1002", 0)]}
  assert ids["ade20k"] == {"train": [(b"ADE_train_00000001", 0)], "val": [(b"ADE_val_00000001", 0)]}
  record = _records(ln["flickr30k"], "train")[0]
  assert record["image"].shape == (H, W, 3) and record["caption"] == b"a dog on the grass"


def test_ln_bad_input_is_skipped_and_counted(ln):
  assert common.skipped_counts(ln["coco"])["train"] == {
      "duplicate narrative": 1, "trace far outside the image": 1, "trace with no points": 1,
      "empty caption": 1, "non-UTF-8 caption": 1, "invalid JSON": 1, "missing image": 1,
      "corrupt image": 1, "malformed image_id": 1, "non-UTF-8 line": 1}
  assert all(not counts for name in ("open_images", "flickr30k", "ade20k")
             for counts in common.skipped_counts(ln[name]).values())
  slightly = {r["image_id"]: r for r in _records(ln["coco"], "train")}[b"9"]
  np.testing.assert_allclose(slightly["trace"][:, 0], [-0.2, 0.5, 1.3], atol=1e-6)  # stored as is
  boxes = np.asarray(slightly["utterance_boxes"])
  assert boxes.min() >= 0.0 and boxes.max() <= 1.0 and boxes[0, 0] == 0.0 and boxes[1, 2] == 1.0


# ---------------------------------------------------------------- masks

def _column_runs(mask):
  flat = np.asarray(mask, np.uint8).flatten(order="F")
  runs, value, n = [], 0, 0
  for v in flat:
    if v == value:
      n += 1
    else:
      runs.append(n)
      value, n = v, 1
  return runs + [n]


def test_rle_both_forms_match_pycocotools():
  rng = np.random.default_rng(0)
  mask = (rng.random((H, W)) < 0.3).astype(np.uint8)
  compressed = mask_api.encode(np.asfortranarray(mask))
  np.testing.assert_array_equal(masks.rle_to_mask(compressed, W, H), mask)
  as_str = {"size": [H, W], "counts": compressed["counts"].decode()}
  np.testing.assert_array_equal(masks.segmentation_to_mask(as_str, W, H), mask)
  uncompressed = {"size": [H, W], "counts": _column_runs(mask)}
  np.testing.assert_array_equal(masks.segmentation_to_mask(uncompressed, W, H), mask)
  assert masks._runs_of_compressed(compressed["counts"]) == _column_runs(mask)


@pytest.mark.parametrize("rle,reason", [
    ({"size": [H, W + 1], "counts": [H * (W + 1)]}, "RLE size differs"),
    ({"size": [H, W], "counts": [5, 3]}, "malformed segmentation"),             # short
    ({"size": [H, W], "counts": [H * W + 2, -2]}, "malformed segmentation"),     # negative
    ({"size": [H, W], "counts": "zz"}, "malformed segmentation"),               # garbled string
    ({"size": [H, W], "counts": "1\x7f"}, "malformed segmentation"),            # bad byte
    ({"size": [H, W], "counts": "g"}, "malformed segmentation"),                # ends inside a run
    ({"size": "12x16", "counts": "3"}, "malformed segmentation"),
    ({"size": [H, W], "counts": 3}, "malformed segmentation"),
])
def test_malformed_rle_is_a_bad_record(rle, reason):
  with pytest.raises(common.BadRecord, match=reason):
    masks.rle_to_mask(rle, W, H)


# ---------------------------------------------------------------- RefCOCO family, refer layout

def _rect(x0, y0, x1, y1):
  return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _block_rle(x0, y0, x1, y1, compressed=True):
  mask = np.zeros((H, W), np.uint8)
  mask[y0:y1, x0:x1] = 1
  if compressed:
    rle = mask_api.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode()}, mask
  return {"size": [H, W], "counts": _column_runs(mask)}, mask


CROWD_RLE, CROWD_MASK = _block_rle(8, 2, 11, 4)
UNCOMPRESSED_RLE, UNCOMPRESSED_MASK = _block_rle(1, 6, 5, 11, compressed=False)
ANNOTATIONS = {  # ann id -> (image id, bbox, segmentation)
    101: (1, [2, 2, 4, 4], _rect(2, 2, 6, 6)),
    102: (1, [8, 2, 3, 2], CROWD_RLE),
    103: (1, [1, 6, 4, 5], UNCOMPRESSED_RLE),
    104: (1, [0, 0, 2, 2], {"size": [H + 1, W], "counts": [(H + 1) * W]}),
    201: (2, [0, 0, 4, 4], _rect(0, 0, 4, 4)),
    301: (3, [0, 0, 4, 4], _rect(0, 0, 4, 4)),
    401: (4, [0, 0, 4, 4], _rect(0, 0, 4, 4)),
    501: (5, [0, 0, 4, 4], _rect(0, 0, 4, 4)),
    601: (6, [0, 0, 4, 4], _rect(0, 0, 4, 4)),
}


def _instances(ann_ids):
  images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": W, "height": H}
            for i in range(1, 7)]
  anns = [{"id": a, "image_id": ANNOTATIONS[a][0], "bbox": ANNOTATIONS[a][1], "category_id": 1,
           "segmentation": ANNOTATIONS[a][2], "area": 1.0, "iscrowd": int(a == 102)} for a in ann_ids]
  return json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "p"}]})


def _refs(*rows):
  """rows: (ref_id, ann_id, split, [(sent_id, sent), ...])."""
  return [{"ref_id": r, "ann_id": a, "image_id": ANNOTATIONS[a][0], "split": s, "category_id": 1,
           "file_name": f"COCO_train2014_{ANNOTATIONS[a][0]:012d}_{a}.jpg",
           "sent_ids": [i for i, _ in sents],
           "sentences": [{"sent_id": i, "sent": t, "raw": t, "tokens": t.split()} for i, t in sents]}
          for r, a, s, sents in rows]


def _write_refer(m):
  for i in range(1, 7):
    _jpg(f"{m}/coco/train2014/COCO_train2014_{i:012d}.jpg")
  files = {
      "refcoco/refs(unc).p": _refs((0, 101, "train", [(0, "left box"), (1, "the box")]),
                                   (1, 102, "train", [(2, "the crowd")]),
                                   (2, 201, "testA", [(3, "a person")]),
                                   (3, 301, "train", [(4, "also in refcocog val")]),
                                   (4, 501, "val", [(5, "val box")]),
                                   (5, 104, "train", [(6, "bad rle size")]),
                                   (6, 601, "testB", [(7, "a thing")])),
      "refcoco/refs(google).p": _refs((0, 101, "train", [(0, "left box")]),
                                      (1, 102, "val", [(1, "the crowd")]),
                                      (2, 201, "test", [(2, "a person")])),
      "refcoco+/refs(unc).p": _refs((0, 103, "train", [(0, "uncompressed")]),
                                    (1, 401, "train", [(1, "only in refcoco+")]),
                                    (2, 201, "testB", [(2, "a person")])),
      "refcocog/refs(umd).p": _refs((0, 101, "train", [(0, "the left box in g")]),
                                    (1, 301, "val", [(1, "held out by g val")]),
                                    (2, 501, "test", [(2, "g test")])),
      "refcocog/refs(google).p": _refs((0, 101, "train", [(0, "g google")]),
                                       (1, 301, "val", [(1, "g google val")])),
  }
  for name, refs in files.items():
    _write(f"{m}/refer/{name}", pickle.dumps(refs))
  for dataset in ("refcoco", "refcoco+", "refcocog"):
    _write(f"{m}/refer/{dataset}/instances.json", _instances(ANNOTATIONS))


@pytest.fixture(scope="module")
def refer_real(tmp_path_factory):
  root = tmp_path_factory.mktemp("refer_real")
  m = str(root / "manual")
  _write_refer(m)
  return {name: common.prepare("refer", name, m, str(root / "data"))
          for name in ("refcoco_unc", "refcoco_google", "refcocog_umd", "refcoco_mixed")}


def _by_id(records):
  return {int(r["image_id"]): r for r in records}


def test_refcoco_unc_records_polygon_and_rle_masks(refer_real):
  builder = refer_real["refcoco_unc"]
  assert {s: sorted(_by_id(_records(builder, s))) for s in ("train", "val", "testA", "testB")} == {
      "train": [1, 3], "val": [5], "testA": [2], "testB": [6]}
  r = _by_id(_records(builder, "train"))[1]
  np.testing.assert_array_equal(r["objects"]["id"], [101, 102])
  np.testing.assert_allclose(np.asarray(r["objects"]["box"])[1], [8 / W, 2 / H, 11 / W, 4 / H], atol=1e-6)
  mask = np.asarray(r["objects"]["mask"])[..., 0]
  assert mask[0].sum() == 16 and mask[0, 2:6, 2:6].all()
  np.testing.assert_array_equal(mask[1], CROWD_MASK)
  assert list(r["expressions"]["text"]) == [b"left box", b"the box", b"the crowd"]
  assert common.skipped_counts(builder)["train"] == {"RLE size differs from the image": 1}


def test_refcoco_google_shares_images_between_splits(refer_real):
  builder = refer_real["refcoco_google"]
  train, val = _by_id(_records(builder, "train")), _by_id(_records(builder, "val"))
  assert sorted(train) == sorted(val) == [1]
  assert list(train[1]["objects"]["id"]) == [101] and list(val[1]["objects"]["id"]) == [102]
  assert sorted(_by_id(_records(builder, "test"))) == [2]


def test_refcocog_umd_splits(refer_real):
  builder = refer_real["refcocog_umd"]
  assert [sorted(_by_id(_records(builder, s))) for s in ("train", "val", "test")] == [[1], [3], [5]]


def test_mixed_train_excludes_every_val_and_test_image(refer_real):
  builder = refer_real["refcoco_mixed"]
  assert list(builder.info.splits) == ["train"]
  train = _by_id(_records(builder, "train"))
  assert 3 not in train  # in RefCOCO train, but in RefCOCOg val
  assert sorted(train) == [1, 4]
  r = train[1]
  np.testing.assert_array_equal(r["objects"]["id"], [101, 102, 103])  # 101 shared by RefCOCO and g
  stride = refer.SOURCE_ID_STRIDE
  np.testing.assert_array_equal(r["expressions"]["ref_id"], [0, 0, 1, stride, 2 * stride])
  np.testing.assert_array_equal(r["expressions"]["sent_id"], [0, 1, 2, stride, 2 * stride])
  np.testing.assert_array_equal(r["expressions"]["object_index"], [0, 0, 1, 2, 0])
  np.testing.assert_array_equal(np.asarray(r["objects"]["mask"])[2, ..., 0], UNCOMPRESSED_MASK)
  assert common.skipped_counts(builder)["train"] == {
      "image in a held-out split": 1, "RLE size differs from the image": 1}


def test_refer_pickle_with_code_is_refused_for_real_configs(tmp_path):
  m = str(tmp_path / "manual")
  _write_refer(m)
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  _write(f"{m}/refer/refcocog/refs(umd).p", pickle.dumps([Payload()]))
  with pytest.raises(ValueError, match=r"refcocog/refs\(umd\)\.p: refused"):
    common.prepare("refer", "refcocog_umd", m, str(tmp_path / "data"))
  assert not marker.exists()


# ---------------------------------------------------------------- MDETR layout

def _mdetr(entries):
  """entries: (entry id, COCO image id, caption, [(ann id, original ann id or None, with seg)])."""
  images, anns = [], []
  for entry_id, image_id, caption, boxes in entries:
    images.append({"id": entry_id, "original_img_id": image_id, "caption": caption,
                   "file_name": f"COCO_train2014_{image_id:012d}.jpg",
                   "height": str(H) if image_id == 6 else H, "width": W, "dataset_name": "refcoco",
                   "tokens_negative": [[0, 3]], "tokens_positive_eval": [[[0, 3]]]})
    for ann_id, original, with_seg in boxes:
      ann = {"id": ann_id, "image_id": entry_id, "category_id": 1, "area": 16, "iscrowd": 0,
             "bbox": ANNOTATIONS[original][1], "tokens_positive": [[0, 3]], "original_id": original}
      if with_seg:
        ann["segmentation"] = ANNOTATIONS[original][2]
      anns.append(ann)
  return json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1}]})


@pytest.fixture(scope="module")
def mdetr(tmp_path_factory):
  root = tmp_path_factory.mktemp("mdetr")
  m = str(root / "manual")
  for i in range(1, 7):
    _jpg(f"{m}/coco/train2014/COCO_train2014_{i:012d}.jpg")
  d = f"{m}/mdetr_annotations"
  files = {
      "refcoco_train": [(0, 1, "left box", [(0, 101, True)]),
                        (1, 1, "the crowd", [(1, 102, True)]),
                        (2, 1, "mask from coco", [(2, 103, False)]),
                        (3, 3, "two boxes", [(3, 301, True), (4, 301, True)]),
                        (4, 4, "  ", [(5, 401, True)]),
                        (5, 1, "left box again", [(6, 101, True)])],
      "refcoco_val": [(0, 5, "val box", [(0, 501, True)])],
      "refcoco_testA": [(0, 2, "a person", [(0, 201, True)])],
      "refcoco_testB": [(0, 6, "a thing", [(0, 601, True)])],
      "refcoco+_train": [(0, 6, "only in refcoco+", [(0, 601, True)])],
      "refcocog_train": [(0, 1, "the left box in g", [(0, 101, True)])],
      "refcocog_val": [(0, 6, "held out by g val", [(0, 601, True)])],
  }
  for split in ("val", "testA", "testB"):
    files.setdefault(f"refcoco+_{split}", [])
  files.setdefault("refcocog_test", [])
  for name, entries in files.items():
    _write(f"{d}/final_{name}.json", _mdetr(entries))
  _write(f"{m}/coco/annotations/instances_train2014.json", _instances(ANNOTATIONS))
  return {name: common.prepare("refer", name, m, str(root / "data"))
          for name in ("mdetr_refcoco", "mdetr_mixed")}


def test_mdetr_expressions_are_grouped_by_coco_image(mdetr):
  builder = mdetr["mdetr_refcoco"]
  assert {s: sorted(_by_id(_records(builder, s))) for s in ("train", "val", "testA", "testB")} == {
      "train": [1], "val": [5], "testA": [2], "testB": [6]}
  r = _by_id(_records(builder, "train"))[1]
  np.testing.assert_array_equal(r["objects"]["id"], [101, 102, 103])
  np.testing.assert_array_equal(r["expressions"]["sent_id"], [0, 1, 2, 5])
  np.testing.assert_array_equal(r["expressions"]["ref_id"], [0, 1, 2, 6])
  np.testing.assert_array_equal(r["expressions"]["object_index"], [0, 1, 2, 0])
  masks_ = np.asarray(r["objects"]["mask"])[..., 0]
  np.testing.assert_array_equal(masks_[1], CROWD_MASK)
  np.testing.assert_array_equal(masks_[2], UNCOMPRESSED_MASK)  # taken from COCO instances
  assert common.skipped_counts(builder)["train"] == {
      "expression without exactly one box": 1, "empty expression": 1, "no valid expressions": 1}


def test_mdetr_mixed_excludes_held_out_images(mdetr):
  builder = mdetr["mdetr_mixed"]
  train = _by_id(_records(builder, "train"))
  assert sorted(train) == [1]  # image 6 is in RefCOCOg val
  stride = refer.SOURCE_ID_STRIDE
  assert list(train[1]["expressions"]["sent_id"]) == [0, 1, 2, 5, 2 * stride]
  assert common.skipped_counts(builder)["train"]["image in a held-out split"] == 1


# ---------------------------------------------------------------- Visual Genome, raw + DenseCap splits

@pytest.fixture(scope="module")
def vg_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("vg_raw")
  m = str(root / "manual")
  _jpg(f"{m}/vg/VG_100K/1.jpg", (20, 10))
  _jpg(f"{m}/vg/VG_100K_2/2.jpg", (20, 10))
  _write(f"{m}/vg/VG_100K/3.jpg", b"corrupt")
  _jpg(f"{m}/vg/VG_100K_2/5.jpg", (20, 10))
  _jpg(f"{m}/vg/VG_100K/6.jpg", (20, 10))
  _jpg(f"{m}/vg/VG_100K/8.jpg", (20, 10))
  url = "https://cs.stanford.edu/people/rak248/{}/{}.jpg"
  image_data = [{"image_id": 1, "width": 20, "height": 10, "url": url.format("VG_100K", 1)},
                {"image_id": 2, "width": 20, "height": 10, "url": url.format("VG_100K_2", 2)},
                {"image_id": 3, "width": 20, "height": 10, "url": url.format("VG_100K", 3)},
                {"image_id": 4, "width": 20, "height": 10, "url": url.format("VG_100K", 4)},
                {"id": 5, "width": 20, "height": 10},          # VG 1.0 key, no url: folder searched
                {"image_id": 6, "width": 20, "height": 10, "url": url.format("VG_100K", 6)},
                {"image_id": 8, "width": 20, "height": 10, "url": url.format("VG_100K", 8)}]
  region = lambda rid, iid, phrase, x, y, w, h: {"region_id": rid, "image_id": iid, "phrase": phrase,
                                                 "x": x, "y": y, "width": w, "height": h}
  descriptions = [
      {"id": 1, "regions": [region(10, 1, "a red square", 2, 1, 4, 3),
                            region(11, 1, "zero width", 2, 1, 0, 3),
                            region(12, 1, "", 2, 1, 4, 3),
                            region(13, 1, "far outside", 30, 1, 4, 3),
                            region(10, 1, "duplicate region id", 2, 1, 4, 3),
                            region(14, 2, "region of image 2 in image 1", 2, 1, 4, 3)]},
      {"id": 2, "regions": [{"id": 20, "phrase": "v1.0 keys", "x": 0, "y": 0, "width": 20, "height": 10}]},
      {"id": 3, "regions": [region(30, 3, "corrupt image", 0, 0, 2, 2)]},
      {"id": 4, "regions": [region(40, 4, "missing image", 0, 0, 2, 2)]},
      {"id": 5, "regions": [region(50, 5, "val region", 0, 0, 2, 2)]},
      {"id": 6, "regions": [region(60, 6, "in two splits", 0, 0, 2, 2)]},
      {"id": 8, "regions": [region(80, 8, "test region", 0, 0, 2, 2)]},
      {"id": 99, "regions": [region(990, 99, "not in any split", 0, 0, 2, 2)]},
  ]
  _write(f"{m}/vg/image_data.json", json.dumps(image_data))
  _write(f"{m}/vg/region_descriptions.json", json.dumps(descriptions))
  _write(f"{m}/vg/densecap_splits.json", json.dumps(
      {"train": [1, 2, 3, 4, 6], "val": [5, 6], "test": [7, 8]}))
  return common.prepare("vg_densecap", "densecap", m, str(root / "data"))


def test_vg_raw_records(vg_raw):
  train = _by_id(_records(vg_raw, "train"))
  assert sorted(train) == [1, 2]
  np.testing.assert_array_equal(train[1]["regions"]["id"], [10])
  np.testing.assert_allclose(np.asarray(train[1]["regions"]["box"]), [[0.1, 0.1, 0.3, 0.4]], atol=1e-6)
  assert list(train[2]["regions"]["phrase"]) == [b"v1.0 keys"]
  assert sorted(_by_id(_records(vg_raw, "val"))) == [5]
  assert sorted(_by_id(_records(vg_raw, "test"))) == [8]


def test_vg_raw_skips(vg_raw):
  skipped = common.skipped_counts(vg_raw)
  assert skipped["train"] == {
      "image in two splits": 1, "box with non-positive size": 1, "empty caption": 1,
      "box outside the image": 1, "duplicate region id": 1, "region of another image": 1,
      "corrupt image": 1, "missing image": 1}
  assert skipped["val"] == {"image in two splits": 1}
  assert skipped["test"] == {"image not in image_data.json": 1}


# ---------------------------------------------------------------- COCO captions, Karpathy splits

@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
  root = tmp_path_factory.mktemp("karpathy")
  m = str(root / "manual")

  def entry(cocoid, split, sentences, folder="train2014"):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": cocoid,
            "split": split, "cocoid": cocoid, "sentids": list(range(len(sentences))),
            "sentences": [{"raw": s, "tokens": s.lower().split(), "imgid": cocoid, "sentid": i}
                          for i, s in enumerate(sentences)]}

  images = [entry(9, "train", ["A cat.", "  ", "A cat on a mat. "]),
            entry(25, "restval", ["A dog."], "val2014"),
            entry(30, "val", ["A bird."], "val2014"),
            entry(42, "test", ["\ud800", "A fish."], "val2014"),
            entry(9, "test", ["duplicate cocoid"]),
            entry(77, "train", ["image file missing"]),
            entry(88, "trainval", ["unknown split"]),
            entry(99, "train", [""])]
  for cocoid, folder in ((9, "train2014"), (25, "val2014"), (30, "val2014"), (42, "val2014"),
                         (99, "train2014")):
    _jpg(f"{m}/coco/{folder}/COCO_{folder}_{cocoid:012d}.jpg")
  os.makedirs(f"{m}/coco/val2014", exist_ok=True)
  _write(f"{m}/karpathy/dataset_coco.json", json.dumps({"images": images, "dataset": "coco"}))
  return common.prepare("coco_captions", "karpathy", m, str(root / "data"))


def test_karpathy_records(karpathy):
  train = _by_id(_records(karpathy, "train"))
  assert sorted(train) == [9, 25]  # restval joins train
  assert list(train[9]["caption"]) == [b"A cat.", b"A cat on a mat."]
  assert train[9]["image"].shape == (H, W, 3)
  assert sorted(_by_id(_records(karpathy, "val"))) == [30]
  assert list(_by_id(_records(karpathy, "test"))[42]["caption"]) == [b"A fish."]
  skipped = common.skipped_counts(karpathy)
  assert skipped["index"] == {"unknown split": 1}
  assert skipped["train"] == {"empty caption": 2, "missing image": 1, "image without valid captions": 1}
  assert skipped["test"] == {"duplicate image id": 1, "non-UTF-8 caption": 1}


def test_a_split_with_every_record_skipped_fails_naming_the_reasons(tmp_path):
  m = str(tmp_path / "manual")
  _jpg(f"{m}/coco/train2014/COCO_train2014_000000000009.jpg")
  os.makedirs(f"{m}/coco/val2014")
  images = [{"filepath": f, "filename": f"COCO_{f}_{i:012d}.jpg", "imgid": i, "cocoid": i,
             "split": s, "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}]}
            for i, f, s in ((9, "train2014", "train"), (10, "val2014", "val"), (11, "val2014", "test"))]
  _write(f"{m}/karpathy/dataset_coco.json", json.dumps({"images": images}))
  with pytest.raises(ValueError, match=r"karpathy/val: no valid record to write; .*1 x missing image"):
    common.prepare("coco_captions", "karpathy", m, str(tmp_path / "data"))


# ---------------------------------------------------------------- missing files: one error, every file

EXPECTED_FILES = {
    ("localized_narratives", "open_images"): [
        *(f"localized_narratives/open_images_train_v6_localized_narratives-{i:05d}-of-00010.jsonl"
          for i in range(10)),
        "localized_narratives/open_images_validation_localized_narratives.jsonl",
        "localized_narratives/open_images_test_localized_narratives.jsonl",
        "open_images/train", "open_images/validation", "open_images/test"],
    ("localized_narratives", "ade20k"): [
        "localized_narratives/ade20k_train_localized_narratives.jsonl",
        "localized_narratives/ade20k_validation_localized_narratives.jsonl",
        "ade20k/ADEChallengeData2016/images/training",
        "ade20k/ADEChallengeData2016/images/validation"],
    ("refer", "refcoco_mixed"): [
        "refer/refcoco/instances.json", "refer/refcoco/refs(unc).p",
        "refer/refcoco+/instances.json", "refer/refcoco+/refs(unc).p",
        "refer/refcocog/instances.json", "refer/refcocog/refs(umd).p", "coco/train2014"],
    ("refer", "mdetr_refcocog"): [
        "mdetr_annotations/final_refcocog_train.json", "mdetr_annotations/final_refcocog_val.json",
        "mdetr_annotations/final_refcocog_test.json", "coco/train2014"],
    ("vg_densecap", "densecap"): [
        "vg/region_descriptions.json", "vg/image_data.json", "vg/densecap_splits.json",
        "vg/VG_100K", "vg/VG_100K_2"],
    ("coco_captions", "karpathy"): ["karpathy/dataset_coco.json", "coco/train2014", "coco/val2014"],
}


def _real_configs():
  for name, (module, cls) in sorted(common.BUILDERS.items()):
    for config in getattr(importlib.import_module(module), cls).BUILDER_CONFIGS:
      if config.name != "world":
        yield name, config.name


@pytest.mark.parametrize("builder_name,config_name", list(_real_configs()))
def test_missing_files_give_one_error_listing_them(tmp_path, builder_name, config_name):
  manual = tmp_path / "manual"
  _write(f"{manual}/unrelated.txt", "not a dataset file")
  with pytest.raises(FileNotFoundError) as info:
    common.prepare(builder_name, config_name, str(manual), str(tmp_path / "data"))
  message = str(info.value)
  lines = [line for line in message.splitlines() if line.strip().startswith("MISSING")]
  assert f"{len(lines)} of {len(lines)} expected files are missing" in message
  for path in EXPECTED_FILES.get((builder_name, config_name), []):
    assert f"MISSING {manual}/{path}\n" in message + "\n", (path, message)
  if (builder_name, config_name) in EXPECTED_FILES:
    assert len(lines) == len(EXPECTED_FILES[(builder_name, config_name)])
