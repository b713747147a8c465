"""Inference on a user's own images (pixelllm_jax/infer/) with a tiny model dir.

- The slots inference builds are the tasks' own (`make_slots` on the same prompt).
- A referring answer on a non-square image, in original pixels, equals what evaluation's own
  path gives (the record through `pipeline.eval_batches` at the model's canvas, teacher
  forced): its box on the canvas scaled back to the image, and each word's point.
- A folder and a JSONL of good and bad requests: every bad request is reported with its name
  and reason, the good ones are written (JSON + PNG), the batch goes on past the bad ones;
  the command line exits 1 and lists the failures again.
"""
import base64
import dataclasses
import io
import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from PIL import Image

from pixelllm_jax import tasks
from pixelllm_jax.batch import Batch
from pixelllm_jax.data import pipeline
from pixelllm_jax.infer import inferencer as inferencer_lib
from pixelllm_jax.infer import loading, render
from pixelllm_jax.infer import requests as requests_lib
from pixelllm_jax.infer.__main__ import run_requests
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.tasks import base

import infer_fixtures
from xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer")
  paths = infer_fixtures.make_run(str(root))
  gin.clear_config()
  try:
    loaded = loading.load(paths["model_dir"])
  finally:
    gin.clear_config()
  world_image = sorted(os.listdir(paths["images"]))[0]
  pixels = np.asarray(Image.open(os.path.join(paths["images"], world_image)).convert("RGB"))
  # A user's images: not square, not the canvas size, other formats.
  photos = root / "photos"
  photos.mkdir()
  wide = np.asarray(Image.fromarray(pixels).resize((150, 97), Image.Resampling.BILINEAR))
  Image.fromarray(wide).save(photos / "wide.jpg", quality=95)
  Image.fromarray(pixels).resize((40, 90)).convert("L").save(photos / "tall_grey.png")
  Image.fromarray(pixels).convert("RGBA").save(photos / "alpha.png")
  (photos / "broken.png").write_bytes(b"\x89PNG not really an image")
  return {**paths, "root": root, "loaded": loaded, "photos": photos,
          "inferencer": inferencer_lib.Inferencer(loaded),
          "wide": np.asarray(Image.open(photos / "wide.jpg").convert("RGB"))}


def test_loads_the_run_it_was_given(run):
  loaded = run["loaded"]
  assert loaded.step == infer_fixtures.STEP
  assert loaded.config == (os.path.join(run["model_dir"], "config.gin"),)
  assert loaded.task_config.max_target_len == 32 and loaded.model.config.image_size == 64


def test_converted_weights_load_with_the_model_gin_and_must_cover_it(run, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  params = jax.device_get(run["loaded"].params)
  checkpoint.save_params(str(tmp_path / "whole"), params)
  checkpoint.save_params(str(tmp_path / "t5_only"), {"t5": params["t5"]})
  config = os.path.join(run["model_dir"], "config.gin")
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="has no config.gin"):
      loading.load(str(tmp_path / "whole"))
    loaded = loading.load(str(tmp_path / "whole"), [config])
    gin.clear_config()
    with pytest.raises(ValueError, match=r"do not cover the model: \d+ parameters missing"):
      loading.load(str(tmp_path / "t5_only"), [config])
  finally:
    gin.clear_config()
  assert loaded.step is None
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), params)


def _synthetic_record(task: str, box, expression: str) -> dict:
  """A builder record of `task` holding one prompt (docs/DATA_FORMATS.md)."""
  objects = {"box": np.asarray([box], np.float32), "id": np.asarray([5])}
  expressions = {"text": [expression.encode()], "object_index": np.asarray([0]),
                 "ref_id": np.asarray([1]), "sent_id": np.asarray([2])}
  if task == "refseg":
    objects["mask"] = np.zeros((1, 8, 8, 1), np.uint8)
  return {"caption": {"caption": b""},
          "trace": {"caption": b"", "utterances": [], "utterance_boxes": np.zeros((0, 4)),
                    "utterance_points": np.zeros((0, 2))},
          "loca": {"regions": {"box": np.asarray([box], np.float32), "phrase": [b""],
                               "id": np.asarray([3])}},
          # densecap's request is the whole image: its first slot is a full-image region's
          "densecap": {"regions": {"box": np.asarray([box], np.float32), "phrase": [b""],
                                   "id": np.asarray([3])}},
          }.get(task, {"image": np.zeros((8, 8, 3), np.uint8), "objects": objects,
                       "expressions": expressions})


@pytest.mark.parametrize("task", requests_lib.task_names())
def test_slots_are_the_tasks_own(run, task):
  loaded = run["loaded"]
  kind = requests_lib.PROMPTS[task]
  box = np.array([0.1, 0.2, 0.6, 0.7], np.float32) if kind == "region" else base.FULL_IMAGE_BOX
  expression = "the big red circle" if kind == "expression" else ""
  theirs = tasks.make_slots(task, _synthetic_record(task, box, expression), loaded.tokenizer,
                            loaded.task_config)[0]
  ours = inferencer_lib.make_slot(task, box, expression or None, loaded.tokenizer,
                                  loaded.task_config)
  assert ours.task == theirs.task == task
  np.testing.assert_array_equal(ours.prompt_box, theirs.prompt_box)
  np.testing.assert_array_equal(ours.context, theirs.context)
  np.testing.assert_array_equal(ours.target, theirs.target)
  if kind == "expression":  # "where is <expression>"
    assert loaded.tokenizer.decode(ours.context.tolist()).startswith("where is the big")


def test_refer_answer_in_original_pixels_is_the_canvas_box_scaled_back(run):
  inferencer, loaded = run["inferencer"], run["loaded"]
  image, expression = run["wide"], "the green circle"
  height, width = image.shape[:2]
  answer = inferencer.answer(requests_lib.make_request(
      str(run["photos"] / "wide.jpg"), "refer", expression=expression, name="wide"))
  # Evaluation's path: the same picture as a refer record, on the canvas, teacher forced.
  record = {"image": image, "image_id": 1,
            "objects": {"box": np.zeros((1, 4), np.float32), "id": np.asarray([1])},
            "expressions": {"text": [expression.encode()], "object_index": np.asarray([0]),
                            "ref_id": np.asarray([1]), "sent_id": np.asarray([1])}}
  (batch, _), = pipeline.eval_batches("refer", [record], loaded.tokenizer, loaded.task_config,
                                      batch_size=1, num_slots=1, num_prompts=1, canvas_size=64)
  canvas_h, canvas_w = (batch["image_valid_hw"][0] * 64).round().astype(int)
  assert canvas_h < canvas_w <= 64  # 97 x 150 with its long side on the 64 canvas
  assert answer.json["canvas"] == {"size": 64, "image_hw": [canvas_h, canvas_w]}
  pred = inferencer.predict(Batch(**batch), "teacher_forced")
  box_on_canvas = np.clip(np.asarray(pred.boxes[0, 0], np.float64), 0, 1) * [
      canvas_w, canvas_h, canvas_w, canvas_h]
  scale_back = np.array([width / canvas_w, height / canvas_h] * 2)
  np.testing.assert_allclose(answer.json["box"], box_on_canvas * scale_back, rtol=1e-6)
  assert 0 <= answer.json["box"][0] <= answer.json["box"][2] <= width
  # Each word sits at the mean of its pieces' points, in the same pixels.
  words = answer.json["words"]
  assert " ".join(w["text"] for w in words) == expression == answer.json["text"]
  points = np.asarray(pred.points[0, 0], np.float64)
  position = 0
  for word in words:
    count = len(word["token_ids"])
    expected = np.clip(points[position:position + count].mean((0, 1)), 0, 1) * [width, height]
    np.testing.assert_allclose(word["point"], expected, rtol=1e-6)
    position += count
  assert answer.json["scores"] == {}  # a read expression is not scored


def _requests_file(run) -> str:
  photos = run["photos"]
  lines = [
      {"image": "wide.jpg", "task": "caption"},                                  # 1 good
      {"image": "missing.jpg", "task": "caption"},                               # 2 missing
      {"image": "broken.png", "task": "caption"},                                # 3 unreadable
      {"image": "tall_grey.png", "task": "loca", "box": [5, 5, 60, 50]},         # 4 outside
      {"image": "wide.jpg", "task": "dance"},                                    # 5 unknown
      {"image": "alpha.png", "task": "refer", "expression": "   "},              # 6 empty
      {"image": "tall_grey.png", "task": "loca", "point": [20, 70]},             # 7 good
      {"image": "wide.jpg", "task": "densecap", "box": [1, 1, 9, 9]},            # 8 a box
      "not json",                                                                # 9 bad line
      {"image": "alpha.png", "task": "refer", "expression": "the blue square"},  # 10 good
      {"image": "alpha.png", "task": "refseg", "expression": "the blue square"},  # 11 good
  ]
  path = photos / "requests.jsonl"
  path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                            for line in lines) + "\n")
  return str(path)


EXPECTED_FAILURES = {  # line -> what its message says
    2: "image file not found", 3: "cannot read the image", 4: "not inside the 40x90 image",
    5: "unknown task 'dance'", 6: "needs a non-empty expression",
    8: "task 'densecap' describes the whole image and takes no box", 9: "not valid JSON",
}


def test_jsonl_batch_goes_past_bad_requests_and_names_each(run, tmp_path):
  requests = requests_lib.read_requests(_requests_file(run), "caption")
  summary = run_requests(run["inferencer"], requests, str(tmp_path))
  failed = {f["request"]: f["error"] for f in summary["failed"]}
  assert len(failed) == len(EXPECTED_FAILURES)
  for line, reason in EXPECTED_FAILURES.items():
    (name, error), = [(n, e) for n, e in failed.items() if n.startswith(f"line {line} of")]
    assert error.startswith(f"line {line} of requests.jsonl") and reason in error, error
  assert [a["request"] for a in summary["answered"]] == [
      "line 1 of requests.jsonl (wide.jpg)", "line 7 of requests.jsonl (tall_grey.png)",
      "line 10 of requests.jsonl (alpha.png)", "line 11 of requests.jsonl (alpha.png)"]
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == summary
  for row, (size, task) in zip(summary["answered"], [((150, 97), "caption"), ((40, 90), "loca"),
                                                     ((64, 64), "refer"), ((64, 64), "refseg")],
                               strict=True):
    with open(tmp_path / row["json"]) as f:
      answer = json.load(f)
    assert answer["task"] == task and answer["image_size"] == list(size)
    for word in answer["words"]:
      assert 0 <= word["point"][0] <= size[0] and 0 <= word["point"][1] <= size[1]
    png = Image.open(tmp_path / row["png"])
    scale = render.display_scale(*size)
    assert png.size == (round(size[0] * scale), round(size[1] * scale))
  with open(tmp_path / summary["answered"][1]["json"]) as f:
    loca = json.load(f)
  assert loca["prompt"] == {"point": [20.0, 70.0]}
  assert loca["scores"]["log_likelihood"] < 0


def test_folder_of_images(run, tmp_path):
  requests = requests_lib.read_requests(str(run["photos"]), "loca", point=[10, 10])
  assert [getattr(r, "name") for r in requests] == ["alpha.png", "broken.png", "tall_grey.png",
                                                    "wide.jpg"]
  summary = run_requests(run["inferencer"], requests, str(tmp_path))
  assert [f["request"] for f in summary["failed"]] == ["broken.png"]
  assert len(summary["answered"]) == 3
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["summary.json"] + [f"{i:04d}_{n}.{e}" for i, n in ((0, "alpha"), (2, "tall_grey"),
                                                          (3, "wide")) for e in ("json", "png")])


def test_command_line_reports_failures_and_exits_1(run, tmp_path):
  jsonl = tmp_path / "mixed.jsonl"
  jsonl.write_text(json.dumps({"image": str(run["photos"] / "alpha.png"), "task": "refer",
                               "expression": "the circle"}) + "\n"
                   + json.dumps({"image": str(run["photos"] / "alpha.png"), "task": "loca",
                                 "box": [0, 0, 100, 10]}) + "\n")
  out = tmp_path / "out"
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  done = subprocess.run([sys.executable, "-m", "pixelllm_jax.infer",
                         f"--checkpoint={run['model_dir']}", f"--input={jsonl}",
                         f"--out_dir={out}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 1, done.stdout + done.stderr[-3000:]
  assert "1 answered, 1 failed" in done.stdout
  tail = done.stderr.split("failed requests:")[-1]
  assert "line 2 of mixed.jsonl (" in tail and "box [0.0, 0.0, 100.0, 10.0] is not inside" in tail
  with open(out / "0000_alpha.json") as f:
    assert json.load(f)["prompt"] == {"expression": "the circle"}


def test_pixels_of_any_format():
  buffer = io.BytesIO()
  Image.fromarray((np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)).save(buffer, "PNG")
  pixels = inferencer_lib.pixels_of(Image.open(buffer))
  assert pixels.shape == (3, 4, 3) and pixels.dtype == np.uint8 and pixels.max() == 255
  floats = Image.fromarray(np.array([[0.0, 0.5, 2.0]], np.float32))
  np.testing.assert_array_equal(inferencer_lib.pixels_of(floats)[0, :, 0], [0, 64, 255])
  cmyk = Image.new("CMYK", (5, 2), (0, 255, 255, 0))  # red
  np.testing.assert_array_equal(inferencer_lib.pixels_of(cmyk)[0, 0], [255, 0, 0])


def _mask_model(run):
  """The toy model with a mask head (tests/model_fixtures.py) behind the run's tokenizer."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import model_fixtures as mf  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.model import PixelLLMModel  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  loaded = run["loaded"]
  config = mf.toy_config()
  config = dataclasses.replace(config, t5=dataclasses.replace(config.t5, vocab_size=256),
                               mask_head=mf.toy_mask_head())
  model = PixelLLMModel(config)
  init = state_lib.param_init_fn(model, loading.init_batch(model, loaded.task_config))
  params = nn.meta.unbox(jax.jit(init)(jax.random.key(3)))
  return inferencer_lib.Inferencer(loading.Loaded(
      model=model, params=params, tokenizer=loaded.tokenizer, task_config=loaded.task_config,
      partitioner=Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]), step=None,
      source="toy", config=()))


def test_refseg_mask_in_original_pixels_as_evaluation_makes_it(run):
  from pixelllm_jax import serve  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.metrics import segmentation  # pylint: disable=import-outside-toplevel
  inferencer = _mask_model(run)
  image, expression = run["wide"], "the green circle"
  height, width = image.shape[:2]
  answer = inferencer.answer(requests_lib.make_request(
      str(run["photos"] / "wide.jpg"), "refseg", expression=expression, name="wide"))
  mask = segmentation.decode_rle(answer.json["mask"])
  assert mask.shape == (height, width)
  record = {"image": image, "image_id": 1,
            "objects": {"box": np.zeros((1, 4), np.float32), "id": np.asarray([1]),
                        "mask": np.zeros((1, height, width, 1), np.uint8)},
            "expressions": {"text": [expression.encode()], "object_index": np.asarray([0]),
                            "ref_id": np.asarray([1]), "sent_id": np.asarray([1])}}
  loaded = inferencer.loaded
  (batch, _), = pipeline.eval_batches("refseg", [record], loaded.tokenizer, loaded.task_config,
                                      batch_size=1, num_slots=1, num_prompts=1,
                                      canvas_size=inferencer.canvas_size)
  pred = inferencer.predict(Batch(**batch), "teacher_forced")
  expected = segmentation.logits_to_mask(pred.mask_logits[0, 0], batch["image"].shape[1:3],
                                         batch["image_valid_hw"][0], (height, width))
  assert 0 < expected.sum() < expected.size  # a mask with both sides, so the check means something
  np.testing.assert_array_equal(mask, expected)
  assert answer.json["scores"]["mask_iou"] == pytest.approx(float(pred.mask_iou[0, 0]), abs=0)
  # The PNG tints the mask; the page gets it as an RGBA overlay, opaque exactly on the mask.
  plain = render.render(inferencer_lib.Answer(answer.json, answer.image, None))
  tinted = render.render(answer)
  scale = int(render.display_scale(width, height))
  on = np.argwhere(mask)[0] * scale + scale // 2  # a mask pixel's centre in the PNG
  assert (tinted[tuple(on)] != plain[tuple(on)]).any()
  with open(run["photos"] / "wide.jpg", "rb") as f:
    body = {"image": base64.b64encode(f.read()).decode(), "name": "wide.jpg",
            "task": "refseg", "expression": expression}
  response = serve.answer(inferencer, body)
  overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(
      response["mask_png"].split(",", 1)[1]))))
  assert overlay.shape == (height, width, 4)
  np.testing.assert_array_equal(overlay[..., 3] > 0, mask)
  assert response["answer"]["mask"] == answer.json["mask"]


def test_densecap_answer_and_the_tasks_a_model_without_the_head_refuses(run):
  inferencer = run["inferencer"]
  assert inferencer.has_boxes  # the demo's tiny model has the box decoder
  image = run["wide"]
  height, width = image.shape[:2]
  answer = inferencer.answer(requests_lib.make_request(
      str(run["photos"] / "wide.jpg"), "densecap", name="wide")).json
  loaded = inferencer.loaded
  record = {"image": image, "image_id": 1,
            "regions": {"id": np.asarray([1]), "box": np.asarray([[0.1, 0.1, 0.5, 0.5]],
                                                                  np.float32),
                        "phrase": [b"x"]}}
  (batch, _), = pipeline.eval_batches("densecap", [record], loaded.tokenizer, loaded.task_config,
                                      batch_size=1, num_slots=1, num_prompts=1,
                                      canvas_size=inferencer.canvas_size)
  pred = jax.device_get(inferencer._dense(loaded.params, inferencer._device(Batch(**batch))))
  valid = np.flatnonzero(pred.valid[0])
  order = valid[np.argsort(-pred.scores[0][valid], kind="stable")]
  regions = answer["regions"]
  assert len(regions) == len(order) > 0
  for region, d in zip(regions, order):
    expected = np.clip(pred.boxes[0, d], 0, 1) * [width, height, width, height]
    np.testing.assert_allclose(region["box"], expected, rtol=1e-6)
    assert region["score"] == pytest.approx(float(pred.scores[0, d]), abs=0)
    assert region["text"] == loaded.tokenizer.decode(np.asarray(pred.tokens[0, d]).tolist())
  assert answer["words"] == [w for r in regions for w in r["words"]]
  assert answer["text"] == regions[0]["text"]
  without = inferencer_lib.Inferencer(dataclasses.replace(
      loaded, model=PixelLLMModel(dataclasses.replace(loaded.model.config, box_head=None))))
  with pytest.raises(requests_lib.RequestError, match="no box decoder"):
    without.answer(requests_lib.make_request(str(run["photos"] / "wide.jpg"), "densecap",
                                             name="wide"))
  no_masks = inferencer_lib.Inferencer(dataclasses.replace(
      loaded, model=PixelLLMModel(dataclasses.replace(loaded.model.config, mask_head=None))))
  with pytest.raises(requests_lib.RequestError, match="masks are not available in this model"):
    no_masks.answer(requests_lib.make_request(str(run["photos"] / "wide.jpg"), "refseg",
                                              expression="the red one", name="wide"))
