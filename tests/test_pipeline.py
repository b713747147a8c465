"""Slots -> fixed-shape batches: packing, the seeded train mixture, exhaustive eval."""
import io
import itertools

import numpy as np
import pytest
import sentencepiece as spm

from pixelllm_jax.batch import EMPTY_SLOT, shift_right
from pixelllm_jax.tasks import TASK_ID
from pixelllm_jax import tasks
from pixelllm_jax.data import pipeline

EOS = 1
CONFIG = tasks.TaskConfig(max_target_len=8, max_context_len=8, points_per_token=2)
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "big", "small"]


class SpmTokenizer:
  """Minimal T5-id sentencepiece wrapper (pad 0, eos 1, unk 2)."""
  eos_id = EOS

  def __init__(self, proto: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=proto)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)


@pytest.fixture(scope="module")
def tokenizer():
  sentences = [f"where is the {a} {b} on the {c}" for a, b, c in
               itertools.product(WORDS[:3], WORDS[3:6], WORDS[6:8])]
  sentences += ["a photo of", "an object of", "describe in detail"]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=64, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  return SpmTokenizer(model.getvalue())


def refer_record(image_id, num_expressions, size=(16, 16)):
  rng = np.random.default_rng(image_id)
  return {
      "image": np.full((*size, 3), image_id % 256, np.uint8), "image_id": image_id,
      "objects": {"id": [0, 1], "box": [np.array([0.1, 0.1, 0.4, 0.5], np.float32),
                                       np.array([0.5, 0.2, 0.9, 0.7], np.float32)],
                  "category": [0, 1]},
      "expressions": {
          "ref_id": list(range(num_expressions)),
          "sent_id": [image_id * 1000 + i for i in range(num_expressions)],
          "object_index": [i % 2 for i in range(num_expressions)],
          "text": [" ".join(rng.choice(WORDS, 2)).encode() for _ in range(num_expressions)]},
  }


def loca_record(image_id, num_regions):
  boxes = [np.array([0.1 * i, 0.05, 0.1 * i + 0.2, 0.5], np.float32) for i in range(num_regions)]
  return {"image": np.full((16, 16, 3), image_id % 256, np.uint8), "image_id": image_id,
          "regions": {"id": list(range(num_regions)), "box": boxes,
                      "phrase": [WORDS[i % len(WORDS)].encode() for i in range(num_regions)]}}


def ln_record(image_id):
  words = ["the", WORDS[image_id % 3], WORDS[3 + image_id % 3], "on the", WORDS[6 + image_id % 2]]
  boxes = np.array([[0.1 * i, 0.1, 0.1 * i + 0.1, 0.3] for i in range(len(words))], np.float32)
  return {"image": np.full((16, 16, 3), image_id % 256, np.uint8), "image_id": str(image_id).encode(),
          "annotator_id": 0, "caption": " ".join(words).encode(),
          "utterances": [w.encode() for w in words],
          "utterance_times": np.zeros((len(words), 2), np.float32),
          "utterance_boxes": boxes, "utterance_points": boxes.reshape(-1, 2, 2).mean(1),
          "trace": np.zeros((0, 3), np.float32)}


def test_pack_example_shapes_dtypes_and_prompt_dedup(tokenizer):
  slots = tasks.refer.make_slots(refer_record(1, 3), tokenizer, CONFIG)
  ex = pipeline.pack_example(np.zeros((16, 16, 3), np.uint8), slots, num_prompts=2, num_slots=4,
                             config=CONFIG)
  want = {"image": ((16, 16, 3), np.uint8), "image_valid_hw": ((2,), np.float32),
          "prompt_boxes": ((2, 4), np.float32), "prompt_index": ((4,), np.int32),
          "context_tokens": ((4, 8), np.int32), "decoder_input_tokens": ((4, 8), np.int32),
          "decoder_target_tokens": ((4, 8), np.int32), "decoder_loss_weights": ((4, 8), np.float32),
          "point_targets": ((4, 8, 2, 2), np.float32), "point_weights": ((4, 8), np.float32),
          "task_ids": ((4,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in ex.items()} == want
  np.testing.assert_array_equal(ex["image_valid_hw"], [1, 1])
  # All three refer slots read the one full-image prompt; the unused prompt is the full image too.
  np.testing.assert_array_equal(ex["prompt_index"], [0, 0, 0, 0])
  np.testing.assert_array_equal(ex["prompt_boxes"], [[0, 0, 1, 1]] * 2)
  np.testing.assert_array_equal(ex["task_ids"], [TASK_ID["refer"]] * 3 + [EMPTY_SLOT])
  np.testing.assert_array_equal(ex["decoder_input_tokens"], shift_right(ex["decoder_target_tokens"]))
  for key in ("context_tokens", "decoder_target_tokens", "decoder_loss_weights", "point_targets",
              "point_weights"):
    assert not ex[key][3].any(), key
  # The referring box sits exactly where the target is EOS.
  np.testing.assert_array_equal(ex["point_weights"][:3] > 0, ex["decoder_target_tokens"][:3] == EOS)


def test_pack_example_gives_loca_regions_one_prompt_each(tokenizer):
  record = loca_record(2, 3)
  slots = tasks.loca.make_slots(record, tokenizer, CONFIG)
  ex = pipeline.pack_example(record["image"], slots, num_prompts=4, num_slots=3, config=CONFIG)
  np.testing.assert_array_equal(ex["prompt_index"], [0, 1, 2])
  np.testing.assert_array_equal(ex["prompt_boxes"][:3], record["regions"]["box"])
  np.testing.assert_array_equal(ex["prompt_boxes"][3], [0, 0, 1, 1])
  with pytest.raises(ValueError, match="distinct prompt boxes"):
    pipeline.pack_example(record["image"], slots, num_prompts=2, num_slots=3, config=CONFIG)


def test_eval_batches_cover_every_expression_in_order(tokenizer):
  n = 4
  records = [refer_record(1, 2 * n + 1), refer_record(2, 3)]
  batches = list(pipeline.eval_batches("refer", records, tokenizer, CONFIG, batch_size=3,
                                       num_slots=n, num_prompts=1))
  assert len(batches) == 2  # rows: 4 + 4 + 1 (record 1), 3 (record 2), 2 padding rows
  seen = []
  for b, (batch, metas) in enumerate(batches):
    assert batch["decoder_target_tokens"].shape == (3, n, 8)
    for row, slot, meta in metas:
      assert batch["task_ids"][row, slot] == TASK_ID["refer"]
      assert batch["image"][row, 0, 0, 0] == meta["image_id"]
      seen.append(meta["sent_id"])
    assert (batch["task_ids"] != EMPTY_SLOT).sum() == len(metas)
  assert seen == [1000 + i for i in range(2 * n + 1)] + [2000, 2001, 2002]
  last, _ = batches[-1]
  np.testing.assert_array_equal(last["task_ids"][1:], EMPTY_SLOT)
  np.testing.assert_array_equal(last["image"][1:], 0)
  # Contexts stay in step with targets: context = "where is " + the target text.
  for batch, metas in batches:
    for row, slot, meta in metas:
      ctx = batch["context_tokens"][row, slot]
      want = tokenizer.encode(f"where is {meta['expression']}")[: CONFIG.max_context_len - 1] + [EOS]
      np.testing.assert_array_equal(ctx[: len(want)], want)


def test_eval_batches_reject_mixed_image_sizes_naming_the_record(tokenizer):
  records = [refer_record(1, 1), refer_record(2, 1, size=(8, 16))]
  with pytest.raises(ValueError, match=r"refer record 1 \(image_id=2\)"):
    list(pipeline.eval_batches("refer", records, tokenizer, CONFIG, batch_size=2, num_slots=2,
                               num_prompts=1))


def _train(tokenizer, seed=0, **kw):
  refer = [refer_record(i, 1 + i % 5) for i in range(1, 11)]
  loca = [loca_record(100 + i, 1 + i % 3) for i in range(6)]
  trace = [ln_record(200 + i) for i in range(4)]
  args = dict(batch_size=4, num_slots=3, num_prompts=3, seed=seed)
  args.update(kw)
  sources = [("refer", refer, 1.0), ("loca", loca, 3.0), ("trace", trace, 1.0)]
  return pipeline.make_train_dataset(sources, tokenizer, CONFIG, **args)


ALL_IMAGES = set(range(1, 11)) | set(range(100, 106)) | set(range(200, 204))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batches_are_fixed_shape_and_seeded(tokenizer):
  batches = _take(iter(_train(tokenizer)), 3)
  for batch in batches:
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["point_targets"].shape == (4, 3, 8, 2, 2)
    assert batch["task_ids"].shape == (4, 3) and batch["task_ids"].dtype == np.int32
    refer = batch["task_ids"] == TASK_ID["refer"]
    np.testing.assert_array_equal(batch["point_weights"][refer] > 0,
                                  batch["decoder_target_tokens"][refer] == EOS)
    # Trace: every real token is localized at its input position (1 .. EOS position).
    trace = batch["task_ids"] == TASK_ID["trace"]
    inputs = batch["decoder_input_tokens"][trace]
    np.testing.assert_array_equal(batch["point_weights"][trace] > 0, (inputs > 0) & (inputs != EOS))
    loca = batch["task_ids"] == TASK_ID["loca"]
    assert not batch["point_weights"][loca].any()
  tasks_seen = set(np.concatenate([b["task_ids"].ravel() for b in batches]).tolist())
  assert tasks_seen >= {TASK_ID["refer"], TASK_ID["loca"], TASK_ID["trace"]}
  _assert_same(batches, _take(iter(_train(tokenizer)), 3))
  _assert_same(batches, _take(iter(_train(tokenizer, num_threads=2)), 3))
  other = _take(iter(_train(tokenizer, seed=1)), 3)
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(batches, other))


def test_train_iterator_state_restores_the_next_batches(tokenizer):
  iterator = iter(_train(tokenizer))
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  first_two = _take(iter(_train(tokenizer)), 2)
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(expected, first_two))
  restored = iter(_train(tokenizer))
  restored.set_state(state)
  _assert_same(expected, _take(restored, 2))


def test_mixture_follows_weights(tokenizer):
  # Weights refer 1 : loca 3 : trace 1 over 50 batches of 4 images.
  images = np.concatenate([b["image"][:, 0, 0, 0] for b in _take(iter(_train(tokenizer)), 50)])
  counts = [int(((images >= lo) & (images < lo + 100)).sum()) for lo in (0, 100, 200)]
  assert 35 <= counts[0] <= 45 and 110 <= counts[1] <= 130 and 35 <= counts[2] <= 45, counts
  # Every record of each source turns up (shuffled, repeated forever).
  assert set(images.tolist()) == ALL_IMAGES


def test_shards_split_records(tokenizer):
  def images(shard_index):
    batches = _take(iter(_train(tokenizer, shard_index=shard_index, shard_count=2)), 20)
    return set(np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).tolist())
  first, second = images(0), images(1)
  assert first and second and not first & second
  assert first | second == ALL_IMAGES


SHAPES = {"refer": pipeline.TaskShape(5, 1, 6, 8), "loca": pipeline.TaskShape(3, 3, 4, 4),
          "trace": pipeline.TaskShape(1, 1, 8, 4)}


def _homogeneous(tokenizer, shapes=SHAPES, **kw):
  refer = [refer_record(i, 1 + i % 5) for i in range(1, 11)]
  loca = [loca_record(100 + i, 1 + i % 3) for i in range(6)]
  trace = [ln_record(200 + i) for i in range(4)]
  sources = [pipeline.TaskSource(task, records, weight, None, shapes.get(task))
             for task, records, weight in (("refer", refer, 1.0), ("loca", loca, 3.0),
                                           ("trace", trace, 1.0))]
  args = dict(batch_size=4, num_slots=3, num_prompts=3, seed=0, homogeneous=True)
  args.update(kw)
  return pipeline.make_train_dataset(sources, tokenizer, CONFIG, **args)


def test_homogeneous_batches_hold_one_task_in_its_own_shape(tokenizer):
  batches = _take(iter(_homogeneous(tokenizer)), 40)
  seen = {}
  for batch in batches:
    task_ids = set(batch["task_ids"].ravel().tolist()) - {EMPTY_SLOT}
    assert len(task_ids) == 1, task_ids
    task = next(t for t, i in TASK_ID.items() if i in task_ids)
    n, k, length, context_len = SHAPES[task]
    assert batch["prompt_boxes"].shape == (4, k, 4)
    assert batch["decoder_target_tokens"].shape == (4, n, length)
    assert batch["point_targets"].shape == (4, n, length, 2, 2)
    assert batch["context_tokens"].shape == (4, n, context_len)
    images = batch["image"][:, 0, 0, 0]
    lo = {"refer": 0, "loca": 100, "trace": 200}[task]
    assert ((images >= lo) & (images < lo + 100)).all()  # whole batch from one source
    seen[task] = seen.get(task, 0) + 1
  # Whole batches follow the weights 1 : 3 : 1 (40 batches).
  assert 4 <= seen["refer"] <= 12 and 18 <= seen["loca"] <= 30 and 4 <= seen["trace"] <= 12, seen
  # A refer record with 5 expressions fills all 5 slots of its own shape (one prompt).
  refer = [b for b in batches if (b["task_ids"] == TASK_ID["refer"]).any()]
  assert max(int((b["task_ids"] == TASK_ID["refer"]).sum(1).max()) for b in refer) == 5


def test_homogeneous_stream_is_seeded_and_resumes(tokenizer):
  iterator = iter(_homogeneous(tokenizer))
  first = _take(iterator, 4)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  _assert_same(first, _take(iter(_homogeneous(tokenizer)), 4))
  restored = iter(_homogeneous(tokenizer))
  restored.set_state(state)
  _assert_same(expected, _take(restored, 3))


def test_homogeneous_without_shapes_uses_the_shared_shape(tokenizer):
  for batch in _take(iter(_homogeneous(tokenizer, shapes={})), 6):
    assert batch["point_targets"].shape == (4, 3, CONFIG.max_target_len, 2, 2)
    assert len(set(batch["task_ids"].ravel().tolist()) - {EMPTY_SLOT}) == 1


def test_own_shapes_need_homogeneous_batches(tokenizer):
  with pytest.raises(ValueError, match="homogeneous"):
    _homogeneous(tokenizer, homogeneous=False)


def test_train_data_refuses_shapes_of_unknown_tasks():
  from pixelllm_jax.data import sources
  with pytest.raises(ValueError, match=r"task_shapes: unknown tasks \['refr'\]"):
    sources.train_data(data=sources.DataConfig("/nowhere"), task_config=CONFIG,
                       mixture=(("refer", 1.0),), batch_size=4, num_slots=1, num_prompts=1,
                       homogeneous=True, task_shapes=(("refr", 1, 1, 4, 4),))
  with pytest.raises(ValueError, match=r"mixture: unknown tasks \['refr'\]"):
    sources.train_data(data=sources.DataConfig("/nowhere"), task_config=CONFIG,
                       mixture=(("refr", 1.0),), batch_size=4, num_slots=1, num_prompts=1)


def test_homogeneous_hosts_agree_on_the_task_of_every_step(tokenizer):
  """Shards hold different records but pick the same source per step: one global shape."""
  def task_sequence(shard_index):
    batches = _take(iter(_homogeneous(tokenizer, shard_index=shard_index, shard_count=2)), 20)
    return [int(b["task_ids"].max()) for b in batches], [b["image"][:, 0, 0, 0] for b in batches]
  (tasks_0, images_0), (tasks_1, images_1) = task_sequence(0), task_sequence(1)
  assert tasks_0 == tasks_1 and len(set(tasks_0)) == 3
  assert not set(np.concatenate(images_0).tolist()) & set(np.concatenate(images_1).tolist())


@pytest.mark.parametrize("fails", [False, True])
def test_data_source_lets_process_0_prepare_first(monkeypatch, fails):
  # Multi-host: the other processes wait at a barrier until process 0 has prepared
  # (and reach the same error if it failed, rather than wait forever).
  from pixelllm_jax.data import sources
  for index in (0, 1):
    calls = []

    def prepare(*args):
      calls.append("prepare")
      if fails:
        raise FileNotFoundError("MISSING annotations")
      return type("Builder", (), {"as_data_source": lambda self, split: split})()

    monkeypatch.setattr(sources.common, "prepare", prepare)
    monkeypatch.setattr(sources.jax, "process_count", lambda: 2)
    monkeypatch.setattr(sources.jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(sources.multihost_utils, "sync_global_devices", calls.append)
    # trace: a task that reads every feature, so the fake builder needs no `info`.
    data = sources.DataConfig("/manual", "/data",
                              builder_configs=(("localized_narratives", "world"),))
    if fails:
      with pytest.raises(FileNotFoundError):
        data.data_source("trace", "train")
    else:
      assert data.data_source("trace", "train") == "train"
    barrier = "prepare localized_narratives/world in /data"
    assert calls == ([barrier, "prepare"] if index else ["prepare", barrier])
