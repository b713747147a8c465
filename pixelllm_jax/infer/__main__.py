"""`python -m pixelllm_jax.infer` (`pixelllm-infer`): a model's answers on your own images.

  python -m pixelllm_jax.infer --checkpoint=runs/demo --input=photo.jpg --task=caption \\
      --out_dir=answers
  python -m pixelllm_jax.infer --checkpoint=runs/demo --input=photos/ --task=loca \\
      --box=10,20,200,180 --out_dir=answers
  python -m pixelllm_jax.infer --checkpoint=runs/demo --input=requests.jsonl --out_dir=answers

--input is an image, a folder of images or a JSONL of requests (infer/requests.py); --task
(default caption) and --box / --point / --expression apply to an image or a folder, and are a
JSONL line's defaults for "task". Tasks: caption, trace (whole image), loca, refer_loca (a box
or a point), refer, refseg (an expression). Coordinates are pixels of the image.
The model: --checkpoint (infer/loading.py), with --gin_file / --gin.NAME=VALUE / --tokenizer
for converted weights or to override the run's config.gin.

Writes per request `<n>_<image name>.json` (the words with their points, boxes, the mask as
COCO RLE, scores; infer/inferencer.py) and `<n>_<image name>.png` (each word at its point),
and `summary.json` listing the answered and the failed requests. A bad request (missing or
unreadable image, box outside the image, unknown task, empty expression, ...) is reported
with its name and skipped; the failures are listed again at the end and the exit status is 1.
"""
import argparse
import json
import os
import re
import sys
import time
from typing import Sequence

from pixelllm_jax import cli, visualize
from pixelllm_jax.infer import inferencer as inferencer_lib
from pixelllm_jax.infer import loading, render
from pixelllm_jax.infer import requests as requests_lib
from pixelllm_jax.infer.requests import Failed, RequestError

try:
  import tqdm
except ImportError:  # progress is printed per request without it
  tqdm = None


def _coords(count: int):
  def parse(text: str) -> list[float]:
    try:
      values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError as e:
      raise argparse.ArgumentTypeError(f"expected {count} numbers, got {text!r}") from e
    if len(values) != count:
      raise argparse.ArgumentTypeError(f"expected {count} numbers, got {text!r}")
    return values
  return parse


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="pixelllm-infer", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  loading.add_arguments(p)
  p.add_argument("--input", required=True, help="an image, a folder of images or a .jsonl")
  p.add_argument("--task", default="caption",
                 help=f"the task (default caption); one of {list(requests_lib.PROMPTS)}")
  p.add_argument("--box", type=_coords(4), default=None, help="x0,y0,x1,y1 in pixels")
  p.add_argument("--point", type=_coords(2), default=None, help="x,y in pixels")
  p.add_argument("--expression", default=None, help="the referring expression")
  p.add_argument("--out_dir", required=True, help="where the JSON and PNG files go")
  return p


def dumps(value) -> str:
  """Indented JSON with each list of numbers on one line (coordinates stay readable)."""
  text = json.dumps(value, indent=1, allow_nan=False)
  return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]",
                lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def _write(out_dir: str, index: int, answer) -> dict[str, str]:
  stem = f"{index:04d}_{os.path.splitext(os.path.basename(answer.json['image']))[0]}"
  json_path, png_path = (os.path.join(out_dir, stem + ext) for ext in (".json", ".png"))
  with open(json_path, "w") as f:
    f.write(dumps(answer.json) + "\n")
  visualize.save_png(png_path, render.render(answer))
  return {"request": answer.json["request"], "json": os.path.basename(json_path),
          "png": os.path.basename(png_path), "text": answer.json["text"]}


def run_requests(inferencer, requests: Sequence, out_dir: str) -> dict[str, list]:
  """Answers every request in turn, writing its files; a bad one is reported and skipped.
  Returns {'answered': [...], 'failed': [{'request', 'error'}]} (also summary.json)."""
  os.makedirs(out_dir, exist_ok=True)
  answered, failed = [], []
  bar = (tqdm.tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr)
         if tqdm is not None else None)
  say = bar.write if bar is not None else print
  for index, request in enumerate(requests):
    try:
      if isinstance(request, Failed):
        raise RequestError(request.error)
      answered.append(_write(out_dir, index, inferencer.answer(request)))
      if bar is None:
        print(f"[{index + 1}/{len(requests)}] {request.name}: {answered[-1]['text']!r}")
    except RequestError as e:
      failed.append({"request": request.name, "error": str(e)})
      say(f"FAILED {e}")
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  summary = {"answered": answered, "failed": failed}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(cli.rewrite_gin_args(sys.argv[1:] if argv is None else argv))
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  try:
    requests = requests_lib.read_requests(args.input, args.task, box=args.box, point=args.point,
                                          expression=args.expression)
  except FileNotFoundError as e:
    print(f"pixelllm-infer: {e}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  try:
    loaded = loading.load_from_args(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"pixelllm-infer: cannot load the model: {e}", file=sys.stderr)
    return 2
  print(f"model: {args.checkpoint} (step {loaded.step}), loaded in "
        f"{time.perf_counter() - start:.1f} s; {len(requests)} requests", flush=True)
  inferencer = inferencer_lib.Inferencer(loaded, args.max_decode_len, args.beam_size, args.alpha)
  summary = run_requests(inferencer, requests, args.out_dir)
  print(f"{len(summary['answered'])} answered, {len(summary['failed'])} failed; "
        f"written to {args.out_dir}")
  if summary["failed"]:
    print("failed requests:", file=sys.stderr)
    for failure in summary["failed"]:
      print(f"  {failure['error']}", file=sys.stderr)
    return 1
  return 0


def run() -> None:
  """Console-script entry (`pixelllm-infer`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
