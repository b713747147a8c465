"""The evaluator's per-task readers on hand-made batches (a fake runner stands in for the model)."""
import json

import numpy as np

from pixelllm_jax.eval import evaluator

EOS = 1


class FakeRunner:
  """Returns fixed points (teacher-forced pass) and fixed tokens (greedy pass)."""

  def __init__(self, points=None, tokens=None):
    self.points, self.tokens = points, tokens

  def forward(self, batch):
    return self.points, None

  def generate(self, batch):
    return self.tokens, None


class WordTokenizer:
  words = {3: "small", 4: "red", 5: "circle", 6: "square"}

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids if i in self.words)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_refer_reads_the_box_at_eos_and_writes_every_prediction(tmp_path):
  # Two expressions of one image; their EOS sits at positions 2 and 1.
  targets = np.array([[[7, 8, EOS, 0], [9, EOS, 0, 0]]], np.int32)
  points = np.zeros((1, 2, 4, 2, 2), np.float32)
  points[0, 0, 2] = [[0.5, 0.5], [0.1, 0.1]]  # corners in either order
  points[0, 1, 1] = [[0.6, 0.6], [0.9, 0.9]]
  points[0, 0, 1] = [[0.0, 0.0], [1.0, 1.0]]  # not the EOS position: must be ignored
  batch = {"decoder_target_tokens": targets, "image": np.zeros((1, 8, 8, 3), np.uint8)}
  metas = [(0, 0, {"image_id": b"12", "sent_id": 3, "expression": "red one",
                   "box": np.array([0.1, 0.1, 0.5, 0.5], np.float32)}),
           (0, 1, {"image_id": "0a1f", "sent_id": 4, "expression": "blue one",
                   "box": np.array([0.0, 0.0, 0.3, 0.3], np.float32)})]
  metrics = evaluator.eval_refer(FakeRunner(points=points), [(batch, metas)], str(tmp_path), 1)
  assert metrics["refer_count"] == 2
  assert metrics["refer_p@0.5"] == 0.5
  rows = _read_jsonl(tmp_path / "predictions_refer.jsonl")
  assert [r["image_id"] for r in rows] == [12, "0a1f"]  # numeric ids as ints, hex ids kept
  assert [r["sent_id"] for r in rows] == [3, 4]
  np.testing.assert_allclose(rows[0]["pred_box"], [0.1, 0.1, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(rows[1]["pred_box"], [0.6, 0.6, 0.9, 0.9], atol=1e-6)
  np.testing.assert_allclose(rows[1]["gt_box"], [0.0, 0.0, 0.3, 0.3], atol=1e-6)


def test_loca_scores_decoded_phrases_and_writes_them(tmp_path):
  tokens = np.array([[[3, 4, 5, EOS], [3, 4, 6, EOS]]], np.int32)
  metas = [(0, 0, {"image_id": 5, "reference": "small red circle",
                   "box": np.array([0.0, 0.0, 0.5, 0.5], np.float32)}),
           (0, 1, {"image_id": 5, "reference": "small red circle",
                   "box": np.array([0.5, 0.5, 1.0, 1.0], np.float32)})]
  metrics = evaluator.eval_captions(FakeRunner(tokens=tokens), [({}, metas)], WordTokenizer(),
                                    "loca", str(tmp_path))
  assert metrics["loca_count"] == 2
  assert metrics["loca_exact_match"] == 0.5
  rows = _read_jsonl(tmp_path / "predictions_loca.jsonl")
  assert [r["prediction"] for r in rows] == ["small red circle", "small red square"]
  assert [r["reference"] for r in rows] == ["small red circle"] * 2
  np.testing.assert_allclose(rows[1]["box"], [0.5, 0.5, 1.0, 1.0])
