"""Generator -> files -> tfds builders -> pipeline, checked against the generator's ground truth.

A tiny world (6 train / 3 val / 3 test scenes at 64 px) is written to disk,
the three builders read it back (config 'world'), and every record is compared
with the scenes the generator drew (re-drawn in memory from the same seeds)
and with `scenes/{split}.jsonl`.
"""
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pixelllm_jax.batch import EMPTY_SLOT, shift_right
from pixelllm_jax.tasks import TASK_ID
from pixelllm_jax import tasks
from pixelllm_jax.data import augment, pipeline, sources
from pixelllm_jax.data.builders import common
from pixelllm_jax.data.tokenizer import Tokenizer
from pixelllm_jax.data.world import generate, scene as scene_lib

NUM = {"train": 6, "val": 3, "test": 3}
SEED = 5
SIZE = 64
BUILDER_NAMES = ("localized_narratives", "refer", "vg_densecap")
NUM_SAMPLES = 16  # trace.NUM_SAMPLES, restated: the box check below is independent of trace.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("roundtrip")
  out = str(root / "world")
  config = scene_lib.WorldConfig(image_size=SIZE)
  result = generate.generate_world(out, num_train=NUM["train"], num_val=NUM["val"],
                                   num_test=NUM["test"], config=config, seed=SEED)
  # The generator's in-memory scenes, re-drawn from the same seeds (scene i of
  # split s draws from default_rng([seed, s, i])); ids run over the splits in order.
  items, images = {}, {}
  image_id, ann_id = 1, 1
  for split in generate.SPLITS:
    items[split] = []
    for index in range(NUM[split]):
      item, image = generate._annotate(split, index, image_id, ann_id, SEED, config)
      items[split].append(item)
      images[image_id] = image
      image_id += 1
      ann_id += len(item.scene.objects)
  scenes = {}
  for split in generate.SPLITS:
    with open(os.path.join(out, "scenes", f"{split}.jsonl")) as f:
      scenes[split] = [json.loads(line) for line in f]
  with open(os.path.join(out, "refer", "world", "instances.json")) as f:
    instances = json.load(f)
  builders = {name: common.prepare(name, "world", out, str(root / "tfds")) for name in BUILDER_NAMES}
  records = {name: {split: [source[i] for i in range(len(source))]
                    for split in generate.SPLITS
                    for source in [builders[name].as_data_source(split)]}
             for name in BUILDER_NAMES}
  return {"out": out, "result": result, "items": items, "images": images, "scenes": scenes,
          "annotations": {a["id"]: a for a in instances["annotations"]},
          "builders": builders, "records": records}


def _png(out, file_name):
  with Image.open(os.path.join(out, "images", file_name)) as image:
    return np.asarray(image.convert("RGB"))


def _narratives(out, split):
  path = os.path.join(out, "localized_narratives", f"world_{split}_localized_narratives.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f]


def _by_image_id(records):
  return {int(r["image_id"]): r for r in records}


# ---------------------------------------------------------------- generator vs its own files


def test_in_memory_scenes_match_the_files(world):
  out = world["out"]
  for split in generate.SPLITS:
    assert [row["image_id"] for row in world["scenes"][split]] == [i.image_id for i in world["items"][split]]
    for row, item in zip(world["scenes"][split], world["items"][split]):
      assert row["file_name"] == item.file_name
      assert [o["box_xyxy"] for o in row["objects"]] == [list(o.box_xyxy) for o in item.scene.objects]
      assert [o["id"] for o in row["objects"]] == [item.ann_id(o.index) for o in item.scene.objects]
      np.testing.assert_array_equal(_png(out, item.file_name), world["images"][item.image_id])
    counts = world["result"]["counts"][split]
    assert counts["images"] == NUM[split]
    assert counts["objects"] == sum(len(i.scene.objects) for i in world["items"][split])
    assert counts["expressions"] == sum(len(i.expressions) for i in world["items"][split])


# ---------------------------------------------------------------- builders vs ground truth


def test_nothing_skipped(world):
  for name, builder in world["builders"].items():
    skipped = common.skipped_counts(builder)
    assert set(generate.SPLITS) <= set(skipped), (name, skipped)
    assert all(counts == {} for counts in skipped.values()), (name, skipped)


def test_record_counts(world):
  records = world["records"]
  for split in generate.SPLITS:
    items = world["items"][split]
    ids = sorted(i.image_id for i in items)
    for name in BUILDER_NAMES:
      assert sorted(_by_image_id(records[name][split])) == ids, (name, split)
      assert len(records[name][split]) == NUM[split], (name, split)
    refer = _by_image_id(records["refer"][split])
    vg = _by_image_id(records["vg_densecap"][split])
    assert (sum(len(r["objects"]["id"]) for r in refer.values())
            == sum(len(r["regions"]["id"]) for r in vg.values())
            == sum(len(i.scene.objects) for i in items))
    assert (sum(len(r["expressions"]["text"]) for r in refer.values())
            == sum(len(i.expressions) for i in items))


def test_images_are_bit_exact(world):
  out = world["out"]
  for name in BUILDER_NAMES:
    for split in generate.SPLITS:
      for image_id, record in _by_image_id(world["records"][name][split]).items():
        image = np.asarray(record["image"])
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(image, world["images"][image_id])
        np.testing.assert_array_equal(
            image, _png(out, f"world_{split}_{image_id:06d}.png"))


def test_refer_objects_boxes_masks_and_expressions(world):
  for split in generate.SPLITS:
    refer = _by_image_id(world["records"]["refer"][split])
    for item in world["items"][split]:
      record = refer[item.image_id]
      objects, expressions = record["objects"], record["expressions"]
      scene_objects = item.scene.objects
      # Every object is referred to, refs come in object order: objects in scene order.
      np.testing.assert_array_equal(objects["id"], [item.ann_id(o.index) for o in scene_objects])
      np.testing.assert_array_equal(objects["category"],
                                    [1 + scene_lib.SHAPES.index(o.shape) for o in scene_objects])
      boxes = np.asarray(objects["box"], np.float32).reshape(-1, 4)
      np.testing.assert_allclose(boxes * SIZE, [o.box_xyxy for o in scene_objects], atol=1e-4)
      assert [t.decode() if isinstance(t, bytes) else t for t in expressions["text"]] == [
          e.text for e in item.expressions]
      np.testing.assert_array_equal(expressions["object_index"],
                                    [e.object_index for e in item.expressions])
      # One ref per object: ref ids and object indices pair up one to one.
      pairs = set(zip(np.asarray(expressions["ref_id"]).tolist(),
                      np.asarray(expressions["object_index"]).tolist()))
      assert len(pairs) == len({r for r, _ in pairs}) == len({o for _, o in pairs}) == len(scene_objects)
      assert len(set(np.asarray(expressions["sent_id"]).tolist())) == len(item.expressions)


def test_refer_masks_equal_the_visible_masks(world):
  for split in generate.SPLITS:
    refer = _by_image_id(world["records"]["refer"][split])
    for item in world["items"][split]:
      masks = refer[item.image_id]["objects"]["mask"]
      for k, obj in enumerate(item.scene.objects):
        mask = np.asarray(masks[k])
        assert mask.shape == (SIZE, SIZE, 1) and set(np.unique(mask)) <= {0, 1}
        mask = mask[..., 0].astype(bool)
        assert obj.mask.sum() == world["annotations"][item.ann_id(k)]["area"]
        iou = (mask & obj.mask).sum() / (mask | obj.mask).sum()
        assert mask.sum() == obj.mask.sum() and iou == 1.0, (item.image_id, k, mask.sum(), iou)


def test_vg_regions(world):
  for split in generate.SPLITS:
    vg = _by_image_id(world["records"]["vg_densecap"][split])
    for item in world["items"][split]:
      regions = vg[item.image_id]["regions"]
      np.testing.assert_array_equal(regions["id"], [item.ann_id(o.index) for o in item.scene.objects])
      boxes = np.asarray(regions["box"], np.float32).reshape(-1, 4)
      np.testing.assert_allclose(boxes * SIZE, [o.box_xyxy for o in item.scene.objects], atol=1e-4)
      assert [p.decode() for p in regions["phrase"]] == [o.phrase for o in item.scene.objects]


def _sample_window(trace_Tx3, start, end):
  """16 samples of the piecewise-linear trace in [start, end], clipped (no extrapolation needed)."""
  t = np.linspace(start, end, NUM_SAMPLES)
  assert trace_Tx3[0, 2] <= start and end <= trace_Tx3[-1, 2]
  xy = np.stack([np.interp(t, trace_Tx3[:, 2], trace_Tx3[:, c]) for c in (0, 1)], -1)
  return np.clip(xy, 0.0, 1.0)


def test_narratives_traces_and_utterances(world):
  out = world["out"]
  for split in generate.SPLITS:
    ln = _by_image_id(world["records"]["localized_narratives"][split])
    rows = {row["image_id"]: row for row in world["scenes"][split]}
    jsonl = {int(n["image_id"]): n for n in _narratives(out, split)}
    named_checked = 0
    for item in world["items"][split]:
      record, raw, row = ln[item.image_id], jsonl[item.image_id], rows[item.image_id]
      assert record["caption"].decode() == item.narrative.caption == raw["caption"]
      assert int(record["annotator_id"]) == 0
      words = [u["utterance"] for u in raw["timed_caption"]]
      assert [u.decode() for u in record["utterances"]] == words
      times = np.array([[u["start_time"], u["end_time"]] for u in raw["timed_caption"]])
      np.testing.assert_allclose(record["utterance_times"], times, atol=1e-6)

      # trace: the JSONL points of every segment, time-sorted.
      points = np.array([[p["x"], p["y"], p["t"]] for segment in raw["traces"] for p in segment])
      assert len(raw["traces"]) in (1, 2)
      points = points[np.argsort(points[:, 2], kind="stable")]
      trace_Tx3 = np.asarray(record["trace"])
      assert trace_Tx3.dtype == np.float32 and trace_Tx3.shape == points.shape
      np.testing.assert_allclose(trace_Tx3, points, atol=1e-6)
      assert np.all(np.diff(trace_Tx3[:, 2]) > 0)

      # utterance boxes: min/max of the trace samples of their window; points inside.
      boxes = np.asarray(record["utterance_boxes"])
      utterance_points = np.asarray(record["utterance_points"])
      assert boxes.shape == (len(words), 4) and utterance_points.shape == (len(words), 2)
      for u, (start, end) in enumerate(times):
        samples = _sample_window(points, start, end)
        np.testing.assert_allclose(boxes[u], np.concatenate([samples.min(0), samples.max(0)]),
                                   atol=1e-5)
        assert np.all(boxes[u, :2] - 1e-6 <= utterance_points[u])
        assert np.all(utterance_points[u] <= boxes[u, 2:] + 1e-6)

      # words naming an object are spoken while the mouse circles inside its box.
      assert row["utterance_objects"] == [item.ann_id(i) if i >= 0 else -1
                                          for i in item.narrative.utterance_objects]
      box_of = {o["id"]: np.asarray(o["box_xyxy"], np.float64) / SIZE for o in row["objects"]}
      for u, object_id in enumerate(row["utterance_objects"]):
        if object_id < 0:
          continue
        box = box_of[object_id]
        assert np.all(box[:2] - 1e-4 <= utterance_points[u]) and np.all(utterance_points[u] <= box[2:] + 1e-4)
        assert np.all(box[:2] - 1e-4 <= boxes[u, :2]) and np.all(boxes[u, 2:] <= box[2:] + 1e-4)
        named_checked += 1
      assert set(row["utterance_objects"]) - {-1} == set(box_of)
    assert named_checked >= 3 * 2 * NUM[split]  # >= 2 objects x 3 attribute words per image


# ---------------------------------------------------------------- through the training pipeline

CONFIG = tasks.TaskConfig(max_target_len=32, max_context_len=24, points_per_token=2)
B, N, K = 8, 4, 4


@pytest.fixture(scope="module")
def tokenizer(world):
  return Tokenizer.from_file(os.path.join(world["out"], "spiece.model"))


def _batch(world, tokenizer, mixture):
  sources = [pipeline.TaskSource(task, world["builders"][builder].as_data_source("train"), 1.0)
             for task, builder in mixture]
  dataset = pipeline.make_train_dataset(sources, tokenizer, CONFIG, batch_size=B, num_slots=N,
                                        num_prompts=K, seed=0)
  return next(iter(dataset))


def test_mixed_batch_has_the_batch_fields(world, tokenizer):
  mixture = [("caption", "localized_narratives"), ("trace", "localized_narratives"),
             ("refer", "refer"), ("loca", "vg_densecap"), ("refer_loca", "refer")]
  batch = _batch(world, tokenizer, mixture)
  L, Lc, P = CONFIG.max_target_len, CONFIG.max_context_len, CONFIG.points_per_token
  expected = {
      "image": ((B, SIZE, SIZE, 3), np.uint8), "image_valid_hw": ((B, 2), np.float32),
      "prompt_boxes": ((B, K, 4), np.float32), "prompt_index": ((B, N), np.int32),
      "context_tokens": ((B, N, Lc), np.int32), "decoder_input_tokens": ((B, N, L), np.int32),
      "decoder_target_tokens": ((B, N, L), np.int32), "decoder_loss_weights": ((B, N, L), np.float32),
      "point_targets": ((B, N, L, P, 2), np.float32), "point_weights": ((B, N, L), np.float32),
      "task_ids": ((B, N), np.int32),
  }
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert set(np.unique(batch["task_ids"]).tolist()) - {EMPTY_SLOT} == {TASK_ID[t] for t, _ in mixture}
  np.testing.assert_array_equal(batch["decoder_input_tokens"], shift_right(batch["decoder_target_tokens"]))
  # Every image is one of the generated train images.
  train_images = [world["images"][i.image_id] for i in world["items"]["train"]]
  for b in range(B):
    assert any(np.array_equal(batch["image"][b], image) for image in train_images)
  # Loca slots read their region box as prompt; that box is a generated object's box.
  boxes = {tuple(np.asarray(o.box_xyxy, np.float32) / SIZE) for i in world["items"]["train"]
           for o in i.scene.objects}
  for b, n in zip(*np.nonzero(batch["task_ids"] == TASK_ID["loca"])):
    prompt = batch["prompt_boxes"][b, batch["prompt_index"][b, n]]
    assert any(np.allclose(prompt, box, atol=1e-6) for box in boxes)


def test_refer_point_targets_are_the_referred_box_corners(world, tokenizer):
  batch = _batch(world, tokenizer, [("refer", "refer")])
  items = world["items"]["train"]
  checked = 0
  for b in range(B):
    item = next(i for i in items if np.array_equal(batch["image"][b], world["images"][i.image_id]))
    text_of = {e.text: e.object_index for e in item.expressions}
    assert len(text_of) == len(item.expressions)  # expressions of one image are distinct
    for n in range(N):
      if batch["task_ids"][b, n] == EMPTY_SLOT:
        continue
      assert batch["task_ids"][b, n] == TASK_ID["refer"]
      target = batch["decoder_target_tokens"][b, n]
      text = tokenizer.decode(target)
      assert text in text_of, text
      instruction = CONFIG.instruction(tasks.get("refer"))
      assert tokenizer.decode(batch["context_tokens"][b, n]) == f"{instruction} {text}"
      eos = int(np.flatnonzero(target == tokenizer.eos_id)[0])
      np.testing.assert_array_equal(np.flatnonzero(batch["point_weights"][b, n]), [eos])
      box = np.asarray(item.scene.objects[text_of[text]].box_xyxy, np.float32) / SIZE
      np.testing.assert_allclose(batch["point_targets"][b, n, eos], box.reshape(2, 2), atol=1e-6)
      assert not batch["decoder_loss_weights"][b, n].any()
      checked += 1
  assert checked >= B * 2  # every refer record has >= 2 objects, so >= 2 slots


def test_refseg_mask_targets_are_the_referred_objects_visible_masks(world, tokenizer):
  # Through the task's own data source (masks decoded) and the training pipeline.
  source = sources.task_data_source(world["builders"]["refer"], "train", "refseg")
  stream = pipeline.make_train_dataset([("refseg", source, 1.0)], tokenizer, CONFIG,
                                       batch_size=B, num_slots=N, num_prompts=K, seed=0)
  batch = next(iter(stream))
  assert batch["mask_targets"].shape == (B, N, SIZE, SIZE)
  checked = 0
  for b in range(B):
    item = next(i for i in world["items"]["train"]
                if np.array_equal(batch["image"][b], world["images"][i.image_id]))
    text_of = {e.text: e.object_index for e in item.expressions}
    for n in range(N):
      if batch["task_ids"][b, n] == EMPTY_SLOT:
        assert not batch["mask_targets"][b, n].any()
        continue
      assert batch["task_ids"][b, n] == TASK_ID["refseg"]
      obj = item.scene.objects[text_of[tokenizer.decode(batch["decoder_target_tokens"][b, n])]]
      np.testing.assert_array_equal(batch["mask_targets"][b, n], obj.mask)
      checked += 1
  assert checked >= B * 2


def test_box_tasks_never_decode_the_masks(world, tokenizer, monkeypatch):
  # Refer records hold a PNG mask per object, which the referring task never reads: decoding
  # them halved its input rate (README, "Input-pipeline throughput"). Its data source keeps
  # them encoded (Task.unread_features), the pipeline drops them before augmentation, and the
  # batches stay those of fully decoded records.
  builder = world["builders"]["refer"]
  decoded = []  # channels of every image tfds decodes: 3 an image, 1 a mask
  decode = tfds.features.Image.decode_example_np
  monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                      lambda self, example: decoded.append(self.shape[-1]) or decode(self, example))
  resampled = []  # PIL filters of every resample: NEAREST for a mask
  resample = augment._resample
  monkeypatch.setattr(augment, "_resample", lambda array, params, filter_: (
      resampled.append(filter_) or resample(array, params, filter_)))

  everything = builder.as_data_source("train")
  records = [everything[i] for i in range(len(everything))]
  assert decoded.count(1) == sum(len(r["objects"]["id"]) for r in records) > 0  # the count sees masks
  source = sources.task_data_source(builder, "train", "refer")
  decoded.clear()
  for i, record in enumerate(records):  # kept as their PNG bytes, for a task that reads them
    kept = source[i]["objects"]["mask"]
    assert len(kept) == len(record["objects"]["mask"])
    for png, mask in zip(kept, record["objects"]["mask"]):
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)))[..., None], mask)
  assert decoded == [3] * len(records)

  def batches(data_source, n=3):
    augmented = pipeline.TaskSource("refer", data_source, 1.0, tasks.get("refer").official_augment)
    stream = iter(pipeline.make_train_dataset([augmented], tokenizer, CONFIG, batch_size=B,
                                              num_slots=N, num_prompts=K, seed=0, canvas_size=SIZE))
    return [next(stream) for _ in range(n)]

  decoded.clear()
  train = batches(source)
  evaluated = list(pipeline.eval_batches("refer", source, tokenizer, CONFIG, batch_size=B,
                                         num_slots=N, num_prompts=K, canvas_size=SIZE))
  assert evaluated and 3 in decoded and 1 not in decoded
  resampled.clear()
  for got, want in zip(train, batches(everything)):  # decoded masks are dropped, not resampled
    assert got.keys() == want.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert resampled and Image.NEAREST not in resampled
