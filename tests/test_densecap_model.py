"""Dense captioning through the model API and the loops: `dense_caption` captions exactly its
own detections, and the evaluation runs end to end on a small generated world. (The train step
with detection targets, its losses and the box decoder's update, on the 8-device fake mesh with
gradient accumulation against one device: tests/test_refseg_model.py, both new heads at once.)
"""
import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from pixelllm_jax import tasks
from pixelllm_jax.data.sources import DataConfig
from pixelllm_jax.data.world import generate, scene as scene_lib
from pixelllm_jax.eval import evaluator as evaluator_lib
from pixelllm_jax.model import DecodeSettings, PixelLLMModel
from pixelllm_jax.tasks import TASK_ID

B, K, N, L, LC, G = 8, 2, 2, 6, 4, 3


def _model(vocab=mf.VOCAB):
  cfg = mf.toy_config()
  cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, vocab_size=vocab),
                            box_head=mf.toy_box_head())
  return PixelLLMModel(cfg)


def _densecap_batch():
  batch = mf.random_batch(7, b=B, k=K, n=N, l=L, lc=LC, detections=G)
  task_ids = np.full((B, N), TASK_ID["densecap"], np.int32)
  return batch.replace(task_ids=task_ids, point_weights=np.zeros_like(batch.point_weights))


def test_dense_caption_captions_exactly_its_detections():
  model = _model()
  batch = _densecap_batch()
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), batch)))()
  settings = DecodeSettings("greedy", max_len=5)
  dense = jax.jit(lambda p, b: model.dense_caption(p, b, settings))(params, batch)
  d = model.config.box_head.max_detections
  assert dense.boxes.shape == (B, d, 4) and dense.scores.shape == dense.valid.shape == (B, d)
  assert dense.tokens.shape == (B, d, 5)
  assert dense.valid.any()
  scores = np.asarray(dense.scores)
  assert (np.diff(np.where(dense.valid, scores, -1.0), axis=1) <= 0).all()  # best first
  # The same captions as generating with the detections given as the prompts.
  prompted = batch.replace(
      prompt_boxes=dense.boxes, prompt_index=np.tile(np.arange(d, dtype=np.int32), (B, 1)),
      context_tokens=np.repeat(batch.context_tokens[:, :1], d, axis=1),
      decoder_input_tokens=np.zeros((B, d, L), np.int32),
      decoder_target_tokens=np.zeros((B, d, L), np.int32),
      decoder_loss_weights=np.zeros((B, d, L), np.float32),
      point_targets=np.zeros((B, d, L, 2, 2), np.float32),
      point_weights=np.zeros((B, d, L), np.float32), task_ids=np.zeros((B, d), np.int32),
      det_boxes=None, det_valid=None)
  generated = jax.jit(lambda p, b: model.predict(p, b, settings))(params, prompted)
  np.testing.assert_array_equal(dense.tokens, generated.tokens)
  np.testing.assert_allclose(dense.points, generated.points, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="no box decoder"):
    PixelLLMModel(mf.toy_config()).check_batch(batch)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_evaluation_end_to_end_on_a_small_world(tmp_path):
  world = str(tmp_path / "world")
  generate.generate_world(world, num_train=2, num_val=1, num_test=5,
                          config=scene_lib.WorldConfig(image_size=mf.IMAGE_SIZE), seed=4)
  model = _model(vocab=generate.VOCAB_SIZE)
  data = DataConfig(manual_dir=world, extra_ids=0)
  config = tasks.TaskConfig(max_target_len=6, max_context_len=6, points_per_token=2,
                            max_detection_boxes=6)
  evaluator = evaluator_lib.Evaluator(
      model=model, data=data, task_config=config, splits={"densecap": ("test",)},
      batch_size=8, num_slots=2, num_prompts=2, num_visualizations=1,
      generation=DecodeSettings("greedy", max_len=4))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.abstract_batch())
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), zeros)))()
  metrics = evaluator.evaluate_step(0, params, str(tmp_path / "out"))
  assert metrics["densecap_images"] == 5
  with open(tmp_path / "out" / "test" / "predictions_densecap.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 5 and len({r["image_id"] for r in rows}) == 5
  assert metrics["densecap_detections"] == sum(len(r["boxes"]) for r in rows)
  assert 0.0 <= metrics["densecap_map"] <= metrics["densecap_detmap"] <= 1.0
