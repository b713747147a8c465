"""Record -> caption slots: alignment, truncation and per-task supervision."""
import numpy as np
import pytest

from pixelllm_jax import tasks
from pixelllm_jax.data import trace

EOS = 1


class WordTokenizer:
  """One id per whitespace word (ids from 3), so token counts are predictable."""
  eos_id = EOS

  def __init__(self):
    self.vocab: dict[str, int] = {}

  def encode(self, text: str) -> list[int]:
    return [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]


def ln_record(utterances, boxes, points, caption=None):
  return {
      "image": np.zeros((8, 8, 3), np.uint8), "image_id": b"7", "annotator_id": 0,
      "caption": (caption or " ".join(utterances)).encode(),
      "utterances": [u.encode() for u in utterances],
      "utterance_times": np.zeros((len(utterances), 2), np.float32),
      "utterance_boxes": np.asarray(boxes, np.float32),
      "utterance_points": np.asarray(points, np.float32),
      "trace": np.zeros((0, 3), np.float32),
  }


def refer_record():
  return {
      "image": np.zeros((8, 8, 3), np.uint8), "image_id": 5,
      "objects": {"id": [10, 11], "box": [np.array([0.1, 0.2, 0.5, 0.6], np.float32),
                                          np.array([0.4, 0.0, 0.9, 0.3], np.float32)],
                  "category": [1, 2]},
      "expressions": {"ref_id": [100, 101, 101], "sent_id": [1000, 1001, 1002],
                      "object_index": [1, 0, 0],
                      "text": [b"big blue square", b"red circle", b"the left thing"]},
  }


BOXES = [[0.1, 0.1, 0.2, 0.3], [0.5, 0.5, 0.7, 0.9], [0.3, 0.0, 0.4, 0.1]]
POINTS = [[0.15, 0.2], [0.6, 0.7], [0.35, 0.05]]


def test_trace_point_of_target_token_j_sits_at_input_position_j_plus_1():
  config = tasks.TaskConfig(max_target_len=8, points_per_token=2)
  # As many one-word utterances as tokens: utterance j belongs to token j.
  [slot] = tasks.trace.make_slots(ln_record(["red", "blue", "green"], BOXES, POINTS),
                             WordTokenizer(), config)
  assert slot.task == "trace" and len(slot.target) == 4 and slot.target[-1] == EOS
  for j in range(3):
    np.testing.assert_allclose(slot.point_targets[j + 1], np.reshape(BOXES[j], (2, 2)))
  np.testing.assert_array_equal(slot.point_weights, [0, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(slot.point_targets[0], 0)
  np.testing.assert_array_equal(slot.loss_weights, [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(slot.meta["utterance_of_token"], [0, 1, 2, -1])
  np.testing.assert_array_equal(slot.prompt_box, [0, 0, 1, 1])


def test_trace_single_point_mode_uses_time_averaged_point():
  config = tasks.TaskConfig(max_target_len=8, points_per_token=1)
  [slot] = tasks.trace.make_slots(ln_record(["red", "blue", "green"], BOXES, POINTS),
                             WordTokenizer(), config)
  assert slot.point_targets.shape == (8, 1, 2)
  for j in range(3):
    np.testing.assert_allclose(slot.point_targets[j + 1, 0], POINTS[j])


def test_trace_skips_invalid_utterances_and_matches_by_relative_position():
  # Utterance 1 is empty, utterance 2 has a missing (zero) point: only 0 and 3 are valid.
  utterances = ["a red circle", "", "and", "a blue square"]
  boxes = BOXES[:2] + [[0, 0, 0, 0], BOXES[2]]
  points = POINTS[:2] + [[0, 0], POINTS[2]]
  record = ln_record(utterances, boxes, points, caption="a red circle and a blue square")
  np.testing.assert_array_equal(trace.utterance_valid(record), [True, False, False, True])
  config = tasks.TaskConfig(max_target_len=16)
  [slot] = tasks.trace.make_slots(record, WordTokenizer(), config)
  expected = trace.assign_utterances_to_tokens(7, [True, False, False, True])
  assert set(expected) == {0, 3}
  np.testing.assert_array_equal(slot.meta["utterance_of_token"][:7], expected)
  for j, u in enumerate(expected):
    np.testing.assert_allclose(slot.point_targets[j + 1], np.reshape(boxes[u], (2, 2)))
  assert slot.point_weights.sum() == 7


def test_trace_truncation_keeps_eos_and_full_narrative_alignment():
  words = [f"w{i}" for i in range(10)]
  boxes = [[i / 20, i / 20, i / 20 + 0.05, i / 20 + 0.05] for i in range(10)]
  points = [[i / 20 + 0.02, i / 20 + 0.02] for i in range(10)]
  config = tasks.TaskConfig(max_target_len=5)
  [slot] = tasks.trace.make_slots(ln_record(words, boxes, points), WordTokenizer(), config)
  assert len(slot.target) == 5 and slot.target[-1] == EOS
  # The 4 kept words keep their own utterances (matched over the whole narrative).
  np.testing.assert_array_equal(slot.meta["utterance_of_token"], [0, 1, 2, 3, -1])
  np.testing.assert_allclose(slot.point_targets[4], np.reshape(boxes[3], (2, 2)))


def test_caption_truncation_keeps_eos():
  tok = WordTokenizer()
  record = {"image": np.zeros((4, 4, 3), np.uint8), "image_id": b"1",
            "caption": b"one two three four five six seven"}
  [slot] = tasks.caption.make_slots(record, tok, tasks.TaskConfig(max_target_len=4))
  np.testing.assert_array_equal(slot.target, tok.encode("one two three") + [EOS])
  np.testing.assert_array_equal(slot.loss_weights, [1, 1, 1, 1])
  assert slot.point_weights.sum() == 0
  np.testing.assert_array_equal(slot.context, tok.encode("a photo of") + [EOS])
  context = tasks.base.encode_with_eos(tok, "a b c d e", 3)
  np.testing.assert_array_equal(context, tok.encode("a b") + [EOS])


@pytest.mark.parametrize("points_per_token", [1, 2])
def test_refer_box_at_eos_target_and_contexts_in_step(points_per_token):
  tok = WordTokenizer()
  config = tasks.TaskConfig(max_target_len=6, points_per_token=points_per_token)
  record = refer_record()
  slots = tasks.refer.make_slots(record, tok, config)
  assert len(slots) == 3
  for slot, text, sent_id, obj in zip(slots, ["big blue square", "red circle", "the left thing"],
                                      [1000, 1001, 1002], [1, 0, 0]):
    np.testing.assert_array_equal(slot.context, tok.encode(f"where is {text}") + [EOS])
    np.testing.assert_array_equal(slot.target, tok.encode(text) + [EOS])
    eos_position = len(slot.target) - 1
    assert np.flatnonzero(slot.point_weights).tolist() == [eos_position]
    box = record["objects"]["box"][obj]
    want = box.reshape(2, 2) if points_per_token == 2 else box.reshape(2, 2).mean(0, keepdims=True)
    np.testing.assert_allclose(slot.point_targets[eos_position], want)
    assert slot.loss_weights.sum() == 0
    assert slot.meta["sent_id"] == sent_id and slot.meta["expression"] == text
    np.testing.assert_array_equal(slot.meta["box"], box)
    np.testing.assert_array_equal(slot.prompt_box, [0, 0, 1, 1])


def test_loca_one_slot_per_region_with_its_box_as_prompt():
  tok = WordTokenizer()
  boxes = [np.array([0.1, 0.1, 0.3, 0.3], np.float32), np.array([0.5, 0.2, 0.9, 0.8], np.float32)]
  record = {"image": np.zeros((4, 4, 3), np.uint8), "image_id": 3,
            "regions": {"id": [7, 8], "box": boxes, "phrase": [b"a red circle", b"blue square"]}}
  slots = tasks.loca.make_slots(record, tok, tasks.TaskConfig(max_target_len=8))
  assert [s.meta["reference"] for s in slots] == ["a red circle", "blue square"]
  for slot, box in zip(slots, boxes):
    np.testing.assert_array_equal(slot.prompt_box, box)
    np.testing.assert_array_equal(slot.context, tok.encode("an object of") + [EOS])
    assert slot.loss_weights.sum() == len(slot.target) and slot.point_weights.sum() == 0



def test_refer_loca_one_slot_per_expression_with_its_object_box_as_prompt():
  tok = WordTokenizer()
  record = refer_record()
  slots = tasks.refer_loca.make_slots(record, tok, tasks.TaskConfig(max_target_len=8))
  assert [s.meta["reference"] for s in slots] == ["big blue square", "red circle",
                                                  "the left thing"]
  for slot, obj in zip(slots, [1, 0, 0]):
    np.testing.assert_array_equal(slot.prompt_box, record["objects"]["box"][obj])
    np.testing.assert_array_equal(slot.context, tok.encode("an object of") + [EOS])
    np.testing.assert_array_equal(slot.target, tok.encode(slot.meta["reference"]) + [EOS])
    assert slot.loss_weights.sum() == len(slot.target) and slot.point_weights.sum() == 0
  # Two expressions of one object: two scored items (official RefCOCOg loca, no merging).
  keys = {tasks.refer_loca._expression_key(s.meta) for s in slots}
  assert len(keys) == 3

def test_make_slots_rejects_unknown_task():
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_slots("llava", {}, WordTokenizer(), tasks.TaskConfig())
