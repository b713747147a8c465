"""Canvas resize/pad and seeded augmentation: crops, flips and jitter keep prompts,
contexts, targets and localization in step."""
import numpy as np
import pytest

from pixelllm_jax import tasks
from pixelllm_jax.tasks import TASK_ID
from pixelllm_jax.data import augment, pipeline

EOS = 1
CONFIG = tasks.TaskConfig(max_target_len=8, max_context_len=8, points_per_token=2)
VOCAB = ["where", "is", "the", "a", "an", "of", "photo", "object", "describe", "in", "detail",
         "left", "right", "leftmost", "rightmost", "red", "green", "blue", "circle", "square",
         "triangle", "on", "big"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}  # objects 0, 1, 2


class FixedTokenizer:
  """One id per known word (ids from 3, unknown -> unk 2); stateless, so runs compare."""
  eos_id = EOS
  ids = {w: 3 + i for i, w in enumerate(VOCAB)}
  words = {i: w for w, i in ids.items()}

  def encode(self, text: str) -> list[int]:
    return [self.ids.get(w, 2) for w in text.split()]

  def decode(self, ids) -> str:
    return " ".join(self.words.get(int(i), "?") for i in ids if i > EOS)


TOK = FixedTokenizer()


def refer_record(image_id=1, hw=(96, 128)):
  """Three solid rectangles on grey, one colour each; expressions name the colour."""
  h, w = hw
  boxes = np.array([[0.05, 0.1, 0.3, 0.45], [0.6, 0.55, 0.95, 0.95], [0.4, 0.1, 0.7, 0.35]],
                   np.float32)
  image = np.full((h, w, 3), 128, np.uint8)
  masks = []
  for box, colour in zip(boxes, COLOURS.values()):
    x0, y0, x1, y1 = np.round(box * [w, h, w, h]).astype(int)
    image[y0:y1, x0:x1] = colour
    mask = np.zeros((h, w, 1), np.uint8)
    mask[y0:y1, x0:x1] = 1
    masks.append(mask)
  return {
      "image": image, "image_id": image_id,
      "objects": {"id": [10, 11, 12], "box": list(boxes), "category": [1, 2, 3], "mask": masks},
      "expressions": {"ref_id": [0, 1, 1, 2], "sent_id": [100, 101, 102, 103],
                      "object_index": [0, 1, 1, 2],
                      "text": [b"the left red square", b"blue square", b"the big blue square",
                               b"green square on the right"]},
  }


def ln_record(hw=(40, 40)):
  words = ["red", "circle", "left", "blue", "square"]
  boxes = np.array([[0.1, 0.1, 0.2, 0.2], [0.12, 0.1, 0.25, 0.3], [0.05, 0.4, 0.3, 0.5],
                    [0.6, 0.6, 0.8, 0.9], [0.7, 0.55, 0.9, 0.8]], np.float32)
  return {"image": np.zeros((*hw, 3), np.uint8), "image_id": b"7", "annotator_id": 0,
          "caption": " ".join(words).encode(), "utterances": [w.encode() for w in words],
          "utterance_times": np.zeros((5, 2), np.float32), "utterance_boxes": boxes,
          "utterance_points": boxes.reshape(-1, 2, 2).mean(1), "trace": np.zeros((0, 3), np.float32)}


def test_swap_left_right_keeps_case_and_leaves_other_words():
  assert augment.swap_left_right("Left of the RIGHT one, leftmost left-hand") == \
      "Right of the LEFT one, rightmost right-hand"
  assert augment.swap_left_right(b"leftover bright rightmost") == b"leftover bright leftmost"


def test_crop_drops_an_object_with_its_expressions_and_keeps_the_rest_in_step():
  record = refer_record()
  # Resize 96x128 -> 96x128 (no scaling), window: top 0, left 0, 64 x 64 = x in [0, 0.5], y in
  # [0, 2/3]: red fully inside, blue (x >= 0.6) cut away, green x 0.4..0.5 of 0.4..0.7 (1/3 kept).
  params = augment.Params((96, 128), (0, 0, 64, 64), False)
  out, valid_hw = augment.apply_params(record, tasks.get("refer"), params, canvas=64, min_visible_fraction=0.25)
  np.testing.assert_array_equal(valid_hw, [1, 1])
  slots = tasks.refer.make_slots(out, TOK, CONFIG)
  assert [s.meta["expression"] for s in slots] == ["the left red square", "green square on the right"]
  assert [s.meta["object_id"] for s in slots] == [10, 12]
  np.testing.assert_allclose(slots[0].meta["box"], [0.1, 0.15, 0.6, 0.675], atol=1e-6)
  np.testing.assert_allclose(slots[1].meta["box"], [0.8, 0.15, 1.0, 0.525], atol=1e-6)
  for slot in slots:
    assert TOK.decode(slot.context) == "where is " + TOK.decode(slot.target)
    eos = len(slot.target) - 1
    np.testing.assert_allclose(slot.point_targets[eos].ravel(), slot.meta["box"], atol=1e-6)
  assert len(out["objects"]["mask"]) == 2 and out["objects"]["mask"][0].shape == (64, 64, 1)
  ys, xs = np.nonzero(out["objects"]["mask"][1][..., 0])  # green, clipped at the window's edge
  np.testing.assert_array_equal([xs.min(), xs.max() + 1, ys.min(), ys.max() + 1],
                                [51, 64, 10, 34])
  # A stricter threshold drops green too, with its expression.
  out, _ = augment.apply_params(record, tasks.get("refer"), params, canvas=64, min_visible_fraction=0.5)
  assert [e.decode() for e in out["expressions"]["text"]] == ["the left red square"]


def test_flip_mirrors_boxes_and_swaps_left_right_in_context_and_target():
  record = refer_record()
  params = augment.Params((96, 128), (0, 0, 96, 128), True)
  out, _ = augment.apply_params(record, tasks.get("refer"), params, canvas=128)
  slots = tasks.refer.make_slots(out, TOK, CONFIG)
  assert TOK.decode(slots[0].target) == "the right red square"
  assert TOK.decode(slots[0].context) == "where is the right red square"
  assert TOK.decode(slots[3].context) == "where is green square on the left"
  for slot, box in zip(slots, np.asarray(record["objects"]["box"])[[0, 1, 1, 2]]):
    np.testing.assert_allclose(slot.meta["box"], [1 - box[2], box[1], 1 - box[0], box[3]], atol=1e-6)
  np.testing.assert_array_equal(out["image"][:96, :128], record["image"][:, ::-1])
  np.testing.assert_array_equal(out["objects"]["mask"][0], record["objects"]["mask"][0][:, ::-1])
  loca = {"image": record["image"], "image_id": 1,
          "regions": {"id": [1], "box": [np.array([0.1, 0.2, 0.3, 0.4], np.float32)],
                      "phrase": [b"leftmost circle"]}}
  out, _ = augment.apply_params(loca, tasks.get("loca"), params, canvas=128)
  np.testing.assert_allclose(out["regions"]["box"][0], [0.7, 0.2, 0.9, 0.4], atol=1e-6)
  assert out["regions"]["phrase"] == [b"rightmost circle"]


@pytest.mark.parametrize("points_per_token", [1, 2])
def test_trace_targets_survive_crop_and_flip(points_per_token):
  config = tasks.TaskConfig(max_target_len=8, max_context_len=8, points_per_token=points_per_token)
  record = ln_record()
  # Window = top-left 20x20 of 40x40 (x, y in [0, 0.5]), flipped: utterances 3, 4 fall outside.
  params = augment.Params((40, 40), (0, 0, 20, 20), True)
  out, _ = augment.apply_params(record, tasks.get("trace"), params, canvas=20)
  [slot] = tasks.trace.make_slots(out, TOK, config)
  [plain] = tasks.trace.make_slots(record, TOK, config)
  assert TOK.decode(slot.target) == "red circle right blue square"
  np.testing.assert_array_equal(slot.meta["utterance_of_token"], plain.meta["utterance_of_token"])
  np.testing.assert_array_equal(slot.point_weights[1:6], [1, 1, 1, 0, 0])
  for j, (x0, y0, x1, y1) in enumerate(record["utterance_boxes"][:3]):
    box = np.clip([1 - 2 * x1, 2 * y0, 1 - 2 * x0, 2 * y1], 0, 1)
    want = box.reshape(2, 2) if points_per_token == 2 else box.reshape(2, 2).mean(0, keepdims=True)
    np.testing.assert_allclose(slot.point_targets[j + 1], want, atol=1e-6)
  assert (slot.point_targets >= 0).all() and (slot.point_targets <= 1).all()


def test_canvas_pads_and_keeps_normalized_coordinates():
  records = [refer_record(1, (96, 128)), refer_record(2, (60, 30))]
  # Eval: long side -> canvas 64 (96x128 -> 48x64; 60x30 -> 64x32), padded bottom/right.
  batches = list(pipeline.eval_batches("refer", records, TOK, CONFIG, batch_size=2, num_slots=4,
                                       num_prompts=1, canvas_size=64))
  [(batch, metas)] = batches
  assert batch["image"].shape == (2, 64, 64, 3)
  np.testing.assert_allclose(batch["image_valid_hw"], [[48 / 64, 1.0], [1.0, 0.5]])
  assert not batch["image"][0, 48:].any() and not batch["image"][1, :, 32:].any()
  for record, row in zip(records, range(2)):
    plain = pipeline.pack_example(record["image"], tasks.refer.make_slots(record, TOK, CONFIG),
                                  num_prompts=1, num_slots=4, config=CONFIG)
    np.testing.assert_array_equal(batch["point_targets"][row], plain["point_targets"])
  # Train without augmentation: images only shrink (60x30 stays), coordinates untouched.
  dataset = pipeline.make_train_dataset([("refer", records, 1.0)], TOK, CONFIG, batch_size=2,
                                        num_slots=4, num_prompts=1, seed=0, canvas_size=64)
  batch = next(iter(dataset))
  for row in range(2):
    valid = batch["image_valid_hw"][row]
    assert tuple(valid) in {(48 / 64, 1.0), (60 / 64, 30 / 64)}
    record = records[0] if valid[1] == 1.0 else records[1]
    slots = {s.meta["sent_id"]: s for s in tasks.refer.make_slots(record, TOK, CONFIG)}
    boxes = {tuple(s.point_targets[len(s.target) - 1].ravel()) for s in slots.values()}
    refer = batch["task_ids"][row] == TASK_ID["refer"]
    eos = batch["decoder_target_tokens"][row] == EOS
    got = {tuple(p.ravel()) for p in batch["point_targets"][row][refer[:, None] & eos]}
    assert got <= boxes


def test_lsj_scale_range_and_window():
  rng = np.random.default_rng(0)
  cfg = augment.AugmentConfig(0.1, 2.0, crop=True, flip=True)
  longs, flips = [], []
  for _ in range(400):
    p = augment.sample_params(480, 640, 384, cfg, train=True, rng=rng)
    (nh, nw), (top, left, ch, cw) = p.resized_hw, p.window
    assert abs(nh / nw - 0.75) < 0.02
    assert (ch, cw) == (min(nh, 384), min(nw, 384))
    assert 0 <= top <= nh - ch and 0 <= left <= nw - cw
    longs.append(nw)
    flips.append(p.flip)
  assert int(384 * 0.1) - 2 <= min(longs) < 384 * 0.15 and 384 * 1.9 < max(longs) <= 768
  assert 0.4 < np.mean(flips) < 0.6
  for h, w in [(480, 640), (640, 480), (100, 333), (384, 384), (50, 1000)]:
    for size in (38, 287, 384, 480, 767):
      nh, nw = augment.scaled_size(h, w, size)
      assert max(nh, nw) <= size and max(nh, nw) >= size - max(h, w) / min(h, w) - 1
  with pytest.raises(ValueError, match="crop"):
    augment.AugmentConfig(0.5, 1.5)


def _train(seed=0, **kw):
  refer = [refer_record(i) for i in range(1, 5)]
  loca = [{"image": refer_record(10 + i)["image"], "image_id": 10 + i,
           "regions": {"id": [0, 1], "box": list(np.asarray(refer_record()["objects"]["box"])[:2]),
                       "phrase": [b"left red square", b"blue square"]}} for i in range(3)]
  trace = [{**ln_record((96, 128)), "image": refer_record(20)["image"]}]
  sources = [pipeline.TaskSource("refer", refer, 1.0, tasks.get("refer").official_augment),
             pipeline.TaskSource("loca", loca, 1.0, tasks.get("loca").official_augment),
             ("trace", trace, 1.0, tasks.get("trace").official_augment)]
  return pipeline.make_train_dataset(sources, TOK, CONFIG, batch_size=3, num_slots=3,
                                     num_prompts=3, seed=seed, canvas_size=64, **kw)


def _assert_same(a_batches, b_batches):
  for a, b in zip(a_batches, b_batches):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_augmented_stream_is_seeded_resumable_and_in_step():
  it = iter(_train())
  batches = [next(it) for _ in range(6)]
  state = it.get_state()
  following = [next(it) for _ in range(2)]
  _assert_same(batches, [next(iter_) for iter_ in [iter(_train())] for _ in range(6)])
  other = iter(_train(seed=1))
  assert any(not np.array_equal(b["image"], next(other)["image"]) for b in batches)
  restored = iter(_train())
  restored.set_state(state)
  _assert_same(following, [next(restored) for _ in range(2)])
  # In step: each refer slot's context is "where is" + its target, and the pixel at the
  # centre of its (augmented) box has the colour its expression names.
  checked = 0
  for batch in batches + following:
    assert batch["image"].shape == (3, 64, 64, 3)
    for row, slot in zip(*np.nonzero(batch["task_ids"] == TASK_ID["refer"])):
      target = TOK.decode(batch["decoder_target_tokens"][row, slot])
      assert TOK.decode(batch["context_tokens"][row, slot]) == "where is " + target
      eos = int(np.argmax(batch["decoder_target_tokens"][row, slot] == EOS))
      (x0, y0), (x1, y1) = batch["point_targets"][row, slot, eos]
      vh, vw = batch["image_valid_hw"][row] * 64
      pixel = batch["image"][row, int((y0 + y1) / 2 * vh), int((x0 + x1) / 2 * vw)].astype(int)
      colour = min(COLOURS, key=lambda c: np.abs(pixel - COLOURS[c]).sum())
      assert colour in target.split(), (target, pixel)
      checked += 1
  assert checked >= 10
