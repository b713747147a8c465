"""The tasks' evaluations on hand-made batches (fixed predictions stand in for the model)."""
import json

import numpy as np

from pixelllm_jax import tasks
from pixelllm_jax.model import Predictions

EOS = 1


def _context(tmp_path, predictions: Predictions, num_visualizations=1):
  """An EvalContext whose model returns `predictions` for every batch, in both modes."""
  return tasks.base.EvalContext(
      teacher_forced=lambda batch: predictions, generate=lambda batch: predictions,
      tokenizer=WordTokenizer(), out_dir=str(tmp_path), num_visualizations=num_visualizations)


class WordTokenizer:
  words = {3: "small", 4: "red", 5: "circle", 6: "square"}

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids if i in self.words)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_refer_scores_the_model_boxes_and_writes_every_prediction(tmp_path):
  # Two expressions of one image; the second box pokes out of the image (clipped).
  targets = np.array([[[7, 8, EOS, 0], [9, EOS, 0, 0]]], np.int32)
  boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 1.2, 0.9]]], np.float32)
  predictions = Predictions(tokens=targets, points=np.zeros((1, 2, 4, 2, 2), np.float32),
                            boxes=boxes)
  batch = {"decoder_target_tokens": targets, "image": np.zeros((1, 8, 8, 3), np.uint8)}
  metas = [(0, 0, {"image_id": b"12", "sent_id": 3, "expression": "red one",
                   "box": np.array([0.1, 0.1, 0.5, 0.5], np.float32)}),
           (0, 1, {"image_id": "0a1f", "sent_id": 4, "expression": "blue one",
                   "box": np.array([0.0, 0.0, 0.3, 0.3], np.float32)})]
  metrics = tasks.get("refer").evaluate(_context(tmp_path, predictions), [(batch, metas)])
  assert metrics["refer_count"] == 2
  assert metrics["refer_p@0.5"] == 0.5
  rows = _read_jsonl(tmp_path / "predictions_refer.jsonl")
  assert [r["image_id"] for r in rows] == [12, "0a1f"]  # numeric ids as ints, hex ids kept
  assert [r["sent_id"] for r in rows] == [3, 4]
  np.testing.assert_allclose(rows[0]["pred_box"], [0.1, 0.1, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(rows[1]["pred_box"], [0.6, 0.6, 1.0, 0.9], atol=1e-6)
  assert (tmp_path / "refer_00.png").exists() and not (tmp_path / "refer_01.png").exists()
  np.testing.assert_allclose(rows[1]["gt_box"], [0.0, 0.0, 0.3, 0.3], atol=1e-6)


def test_loca_scores_decoded_phrases_and_writes_them(tmp_path):
  tokens = np.array([[[3, 4, 5, EOS], [3, 4, 6, EOS]]], np.int32)
  metas = [(0, 0, {"image_id": 5, "reference": "small red circle",
                   "box": np.array([0.0, 0.0, 0.5, 0.5], np.float32)}),
           (0, 1, {"image_id": 5, "reference": "small red circle",
                   "box": np.array([0.5, 0.5, 1.0, 1.0], np.float32)})]
  predictions = Predictions(tokens=tokens, points=np.zeros((1, 2, 4, 2, 2), np.float32),
                            boxes=np.zeros((1, 2, 4), np.float32))
  metrics = tasks.get("loca").evaluate(_context(tmp_path, predictions), [({}, metas)])
  assert metrics["loca_count"] == 2
  assert metrics["loca_exact_match"] == 0.5
  assert set(metrics) == {"loca_count", "loca_exact_match", "loca_cider", "loca_meteor",
                          "loca_bleu4", "loca_rouge_l"}
  rows = _read_jsonl(tmp_path / "predictions_loca.jsonl")
  assert [r["prediction"] for r in rows] == ["small red circle", "small red square"]
  assert [r["references"] for r in rows] == [["small red circle"]] * 2
  np.testing.assert_allclose(rows[1]["box"], [0.5, 0.5, 1.0, 1.0])
