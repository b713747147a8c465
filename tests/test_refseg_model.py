"""Referring segmentation through the model API and the loops: the train step on the 8-device
fake mesh (with gradient accumulation) equals one device, and the evaluation end to end on a
small generated world.

Train step: the toy composer with a mask head and a box decoder, initialized from a batch
*without* masks or detection targets (the heads must exist anyway), then one step on a batch of
refseg and densecap slots with mask and detection targets: one compiled pair (one device, the
mesh) covers both new tasks (tests/test_densecap_model.py has dense captioning's other checks).
Plain SGD at learning rate 1, as tests/test_accumulation.py (there the tolerances are explained:
updated parameters then differ from the initial ones by exactly the gradient).
"""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import model_fixtures as mf
from pixelllm_jax import tasks
from pixelllm_jax.data.sources import DataConfig
from pixelllm_jax.data.world import generate, scene as scene_lib
from pixelllm_jax.eval import evaluator as evaluator_lib
from pixelllm_jax.losses import DET_TERMS, LossConfig
from pixelllm_jax.metrics import refer as refer_metrics, segmentation
from pixelllm_jax.model import DecodeSettings, PixelLLMModel
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.tasks import TASK_ID
from pixelllm_jax.train import optim, state as state_lib, trainer

B, K, N, L, LC, G = 8, 2, 2, 6, 4, 3


def _model(vocab=mf.VOCAB, box_head=False):
  cfg = mf.toy_config(frozen=("prompt_encoder",))
  cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, vocab_size=vocab),
                            mask_head=mf.toy_mask_head(),
                            box_head=mf.toy_box_head() if box_head else None)
  return PixelLLMModel(cfg, loss=LossConfig(box_giou_weight=1.0))


def _refseg_batch(detections=0):
  batch = mf.random_batch(7, b=B, k=K, n=N, l=L, lc=LC, masks=True, detections=detections)
  second = "densecap" if detections else "refer"
  task_ids = np.tile(np.array([[TASK_ID["refseg"], TASK_ID[second]]], np.int32), (B, 1))
  return batch.replace(task_ids=task_ids)


def _step(partitioner, num_microbatches):
  model = _model(box_head=True)
  tx = optim.with_frozen(optax.sgd(1.0), model.trainable)
  first = mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC)  # no mask targets
  assert first.mask_targets is None
  spec = state_lib.state_spec(model, first, tx, partitioner)
  state = spec.init(jax.random.key(0))
  init = jax.device_get(state.params)
  step = trainer.make_train_step(model, tx, partitioner=partitioner,
                                 state_shardings=spec.shardings, num_microbatches=num_microbatches)
  state, metrics = step(state, partitioner.shard_batch(_refseg_batch(detections=G)),
                        jax.random.key(1))
  return init, jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device():
  return _step(Partitioner((1, 1, 1), "dp", jax.devices()[:1]), 1)


def test_refseg_and_densecap_train_step_on_the_mesh_with_accumulation_equals_one_device(
    one_device):
  init, params, metrics = one_device
  assert float(metrics["mask_loss"]) > 0
  assert float(metrics["count/mask_loss"]) == B  # the refseg slots; densecap slots carry none
  for name in DET_TERMS:
    assert float(metrics[name]) > 0, name
  assert float(metrics["count/det_loss"]) == B  # every image has a box
  flat = lambda t: traverse_util.flatten_dict(t, sep="/")  # noqa: E731
  moved = {p for p, v in flat(params).items() if np.abs(v - flat(init)[p]).max() > 0}
  assert "mask_adapter/alpha" in moved  # the gate opens; the rest of the adapter waits for it
  assert any(p.startswith("mask_decoder/") for p in moved)
  assert not any(p.startswith("prompt_encoder/") for p in moved)  # frozen
  assert any(p.startswith("box_head/") for p in moved)

  mesh_init, mesh_params, mesh_metrics = _step(Partitioner((2, 2, 2), "fsdp_tp"), 2)
  jax.tree.map(np.testing.assert_array_equal, mesh_init, init)
  for name in ("loss", "mask_loss", "mask_focal", "mask_dice", "point_loss", "count/mask_loss",
               "text_loss", *DET_TERMS, "count/det_loss"):
    np.testing.assert_allclose(mesh_metrics[name], metrics[name], rtol=1e-5, err_msg=name)
  got, want = flat(mesh_params), flat(params)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=0, atol=3e-5, err_msg=path)


def test_teacher_forced_predictions_carry_the_masks():
  model = _model()
  batch = _refseg_batch()
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), batch)))()
  pred = jax.jit(lambda p, b: model.predict(p, b, DecodeSettings("teacher_forced")))(params, batch)
  out = jax.jit(lambda p, b: model.apply(p, b))(params, batch)
  assert pred.mask_logits.shape == (B, N, 8, 8) and pred.mask_iou.shape == (B, N)
  np.testing.assert_allclose(pred.mask_logits, out.mask_logits, rtol=0, atol=1e-6)
  # Without mask targets the batch still gets masks in prediction (the model has the head).
  plain = jax.jit(lambda p, b: model.predict(p, b, DecodeSettings("teacher_forced")))(
      params, batch.replace(mask_targets=None))
  np.testing.assert_allclose(plain.mask_logits, pred.mask_logits, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="no mask head"):
    PixelLLMModel(mf.toy_config()).check_batch(batch)


def test_evaluation_end_to_end_on_a_small_world(tmp_path):
  world = str(tmp_path / "world")
  generate.generate_world(world, num_train=2, num_val=1, num_test=5,
                          config=scene_lib.WorldConfig(image_size=mf.IMAGE_SIZE), seed=4)
  model = _model(vocab=generate.VOCAB_SIZE)
  data = DataConfig(manual_dir=world, extra_ids=0)
  config = tasks.TaskConfig(max_target_len=12, max_context_len=12, points_per_token=2)
  evaluator = evaluator_lib.Evaluator(
      model=model, data=data, task_config=config,
      splits={"refseg": ("test",)}, batch_size=8, num_slots=4, num_prompts=1,
      num_visualizations=1)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.abstract_batch())
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), zeros)))()
  metrics = evaluator.evaluate_step(0, params, str(tmp_path / "out"))

  source = data.data_source("refseg", "test")
  records = [source[i] for i in range(len(source))]
  gt = {(int(r["image_id"]), int(s)): np.asarray(r["objects"]["mask"][i])[..., 0] > 0
        for r in records for s, i in zip(r["expressions"]["sent_id"],
                                         r["expressions"]["object_index"])}
  assert metrics["refseg_count"] == len(gt) > 5
  with open(tmp_path / "out" / "test" / "predictions_refseg.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == len(gt)
  pred = {(r["image_id"], r["sent_id"]): segmentation.decode_rle(r["pred_mask"]) for r in rows}
  assert pred.keys() == gt.keys()
  keys = sorted(gt)
  want = refer_metrics.segmentation_scores([pred[k] for k in keys], [gt[k] for k in keys])
  np.testing.assert_allclose(metrics["refseg_ciou"], want.ciou, rtol=1e-12)
  np.testing.assert_allclose(metrics["refseg_miou"], want.mean_iou, rtol=1e-12)
  boxes = refer_metrics.refer_precision(np.array([r["pred_box"] for r in rows]),
                                        np.array([r["gt_box"] for r in rows]))
  assert metrics["refseg_p@0.5"] == boxes.precision
  assert 0 <= metrics["refseg_ciou"] <= 1 and all(m.shape == (32, 32) for m in pred.values())
  assert os.path.exists(tmp_path / "out" / "test" / "refseg_00.png")
