"""Offline evaluation of a trained checkpoint (the driver the official release lacks).

  python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"

Restores the latest checkpoint in MODEL_DIR, runs every task on the held-out
split and writes MODEL_DIR/metrics.json plus PNG visualizations under
MODEL_DIR/eval/, and every prediction to MODEL_DIR/eval/predictions_{refer,
caption,loca}.jsonl (one JSON object per expression / caption slot / region).
How each task is read (DESIGN.md sections 2 and 4):
- refer: the expression is teacher forced; the box is the min/max of the two
  points at the position whose target is EOS; P@0.5 counts IoU > 0.5 (strict).
  Every expression of every image is evaluated (no truncation).
- trace: the ground-truth narrative is teacher forced; `trace_l1` is the
  official per-token L1 (normalized coordinates) averaged per image;
  `trace_pointing_acc` is the fraction of object words (utterances that name
  an object, from the world's scenes/{split}.jsonl) whose predicted point
  (midpoint of the token's points) lies inside that object's box. The narrative
  is also generated greedily for the visualizations.
- caption / loca: captions are decoded greedily with the KV cache and scored
  with CIDEr-D against the references; loca also reports exact match.
"""
import json
import os
import time
from typing import Any, Sequence

import gin
import jax
import numpy as np

from pixelllm_jax import decoding
from pixelllm_jax.batch import Batch
from pixelllm_jax.data import pipeline, sources
from pixelllm_jax.data.tasks import TaskConfig
from pixelllm_jax.metrics import boxes as box_lib
from pixelllm_jax.metrics import captioning, refer, trace as trace_metrics
from pixelllm_jax.models.pixel_llm import PixelLLM
from pixelllm_jax.train import checkpoint as ckpt
from pixelllm_jax.train import state as state_lib
from pixelllm_jax.train.trainer import shard_batch
from pixelllm_jax import visualize

EOS = 1


def restore_params(model_dir: str, model, optimizer, mesh, init_batch: Batch):
  """The params of the latest checkpoint in model_dir/checkpoints, on `mesh`."""
  spec = state_lib.state_spec(model, init_batch, optimizer, mesh)
  manager = ckpt.make_manager(os.path.join(model_dir, "checkpoints"), max_to_keep=None)
  restored = ckpt.restore(manager, spec.abstract, spec.shardings)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {os.path.join(model_dir, 'checkpoints')}")
  state, _ = restored
  return int(state.step), state.params


class Runner:
  """Jitted teacher-forced and greedy passes of one model over numpy batches."""

  def __init__(self, model: PixelLLM, params, mesh, max_decode_len: int):
    self.mesh, self.params = mesh, params
    self._forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
    self._generate = jax.jit(
        lambda p, b: decoding.greedy_decode_pixel_llm(
            model, {"params": p}, model.apply({"params": p}, b, method=PixelLLM.encode),
            max_decode_len))

  def forward(self, batch: dict):
    with jax.set_mesh(self.mesh):
      out = self._forward(self.params, shard_batch(batch, self.mesh))
    return np.asarray(out.points), np.asarray(out.logits.argmax(-1))

  def generate(self, batch: dict):
    with jax.set_mesh(self.mesh):
      out = self._generate(self.params, shard_batch(batch, self.mesh))
    return np.asarray(out.tokens), np.asarray(out.points)


def load_scenes(path: str | None) -> dict[int, dict]:
  """image_id -> scene ground truth (objects, utterance_objects), if given."""
  if not path or not os.path.exists(path):
    return {}
  scenes = {}
  with open(path) as f:
    for line in f:
      scene = json.loads(line)
      scenes[int(scene["image_id"])] = scene
  return scenes


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """One JSON object per line (numpy values converted)."""
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
              + "\n")


def _image_id(meta: dict) -> int | str | None:
  """The record's image id: an int when numeric (COCO, the world), else the
  string (Open Images ids are hex strings)."""
  value = meta.get("image_id")
  if isinstance(value, bytes):
    value = value.decode()
  if isinstance(value, str) and not value.isdigit():
    return value
  return None if value is None else int(value)


def eval_refer(runner: Runner, batches, out_dir: str, num_vis: int) -> dict[str, float]:
  preds, gts, rows = [], [], []
  for batch, metas in batches:
    points, _ = runner.forward(batch)
    for row, slot, meta in metas:
      eos = int(np.argmax(batch["decoder_target_tokens"][row, slot] == EOS))
      pred = box_lib.clip_to_image(box_lib.points_to_box(points[row, slot, eos]))
      preds.append(pred)
      gts.append(np.asarray(meta["box"], np.float32))
      rows.append({"image_id": _image_id(meta), "sent_id": meta.get("sent_id"),
                   "expression": meta["expression"], "pred_box": pred, "gt_box": gts[-1]})
      if len(preds) <= num_vis:
        image = visualize.draw_boxes(batch["image"][row], pred, gts[-1], meta["expression"])
        visualize.save_png(os.path.join(out_dir, f"refer_{len(preds) - 1:02d}.png"), image)
  scores = refer.refer_precision(np.stack(preds), np.stack(gts), threshold=0.5)
  write_jsonl(os.path.join(out_dir, "predictions_refer.jsonl"), rows)
  return {"refer_p@0.5": scores.precision, "refer_mean_iou": scores.mean_iou,
          "refer_count": scores.count}


def eval_trace(runner: Runner, batches, scenes: dict[int, dict], tokenizer, out_dir: str,
               num_vis: int) -> dict[str, float]:
  pred_per_image, gt_per_image = [], []
  pointing_pred, pointing_boxes = [], []
  shown = 0
  for batch, metas in batches:
    points, _ = runner.forward(batch)
    weights = batch["point_weights"]
    for row, slot, meta in metas:
      w = weights[row, slot] > 0
      pred_per_image.append(points[row, slot][w])
      gt_per_image.append(batch["point_targets"][row, slot][w])
      scene = scenes.get(_image_id(meta))
      if scene is None:
        continue
      height, width = scene["height"], scene["width"]
      box_of = {o["id"]: np.asarray(o["box_xyxy"], np.float32) / [width, height, width, height]
                for o in scene["objects"]}
      for j, u in enumerate(meta["utterance_of_token"]):
        obj = scene["utterance_objects"][u] if u >= 0 else -1
        if obj >= 0:  # target token j is fed (and localized) at input position j + 1
          pointing_pred.append(points[row, slot, j + 1])
          pointing_boxes.append(box_of[obj])
    if shown < num_vis:
      tokens, gen_points = runner.generate(batch)
      for row, slot, meta in metas[: num_vis - shown]:
        ids = [int(t) for t in tokens[row, slot] if t not in (0, EOS)]
        words = [tokenizer.decode([t]) for t in ids]
        image = visualize.draw_words(batch["image"][row], words,
                                     gen_points[row, slot, : len(ids)].mean(-2))
        visualize.save_png(os.path.join(out_dir, f"trace_{shown:02d}.png"), image)
        shown += 1
  result = {"trace_l1": trace_metrics.point_l1(pred_per_image, gt_per_image),
            "trace_images": len(pred_per_image)}
  if pointing_pred:
    result["trace_pointing_acc"] = trace_metrics.pointing_accuracy(
        np.stack(pointing_pred), np.stack(pointing_boxes))
    result["trace_object_words"] = len(pointing_pred)
  return result


def eval_captions(runner: Runner, batches, tokenizer, prefix: str,
                  out_dir: str) -> dict[str, float]:
  predictions, references, rows = {}, {}, []
  for batch, metas in batches:
    tokens, _ = runner.generate(batch)
    for row, slot, meta in metas:
      key = len(predictions)
      predictions[key] = tokenizer.decode(tokens[row, slot].tolist())
      references[key] = [meta["reference"]]
      rows.append({"image_id": _image_id(meta), "prediction": predictions[key],
                   "reference": meta["reference"]}
                  | ({"box": meta["box"]} if "box" in meta else {}))
  write_jsonl(os.path.join(out_dir, f"predictions_{prefix}.jsonl"), rows)
  result = {f"{prefix}_cider": captioning.cider(predictions, references),
            f"{prefix}_count": len(predictions)}
  if prefix == "loca":
    result["loca_exact_match"] = captioning.exact_match(predictions, references)
  return result


@gin.configurable
def evaluate(*, model_dir: str = gin.REQUIRED, model: PixelLLM = gin.REQUIRED,
             optimizer=gin.REQUIRED, mesh=None, split: str = "test",
             tasks: Sequence[str] = ("refer", "trace", "caption", "loca"),
             batch_size: int = 32, num_slots: int = 4, num_prompts: int = 4,
             scenes_path: str | None = None, num_visualizations: int = 8,
             canvas_size: int | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `model_dir`; writes metrics.json and PNGs.

  `canvas_size`: resize (long side) and pad every image to this square canvas,
  as training does with `train_data.canvas_size` (needed for real datasets).
  """
  start = time.perf_counter()
  mesh = mesh if mesh is not None else jax.make_mesh(
      (1, 1), ("data", "model"), devices=jax.devices()[:1],
      axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tokenizer, task_config = sources.tokenizer(), TaskConfig()
  out_dir = os.path.join(model_dir, "eval")
  os.makedirs(out_dir, exist_ok=True)

  def batches(task):
    return pipeline.eval_batches(task, sources.data_source(task, split), tokenizer, task_config,
                                 batch_size=batch_size, num_slots=num_slots,
                                 num_prompts=num_prompts, canvas_size=canvas_size)

  init_batch, _ = next(iter(batches(tasks[0])))
  step, params = restore_params(model_dir, model, optimizer, mesh, Batch(**init_batch))
  runner = Runner(model, params, mesh, task_config.max_target_len)
  if scenes_path is None:
    scenes_path = os.path.join(sources.dataset_dirs()[0], "scenes", f"{split}.jsonl")
  metrics: dict[str, Any] = {"checkpoint_step": step, "split": split}
  for task in tasks:
    task_start = time.perf_counter()
    if task == "refer":
      metrics.update(eval_refer(runner, batches(task), out_dir, num_visualizations))
    elif task == "trace":
      metrics.update(eval_trace(runner, batches(task), load_scenes(scenes_path), tokenizer,
                                out_dir, num_visualizations))
    elif task in ("caption", "loca"):
      metrics.update(eval_captions(runner, batches(task), tokenizer, task, out_dir))
    else:
      raise ValueError(f"no evaluation for task {task!r}")
    print(f"eval {task}: {time.perf_counter() - task_start:.1f} s", flush=True)
  summary_path = os.path.join(model_dir, "train_summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      metrics["train_seconds"] = json.load(f)["train_seconds"]
  metrics["eval_seconds"] = time.perf_counter() - start
  metrics = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in metrics.items()}
  with open(os.path.join(model_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, sort_keys=True)
  print(json.dumps(metrics, indent=1, sort_keys=True), flush=True)
  return metrics
