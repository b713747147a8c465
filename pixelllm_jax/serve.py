"""`pixelllm-serve --checkpoint DIR` (`python -m pixelllm_jax.serve`): a local demo page.

  python -m pixelllm_jax.serve --checkpoint=runs/demo      # then open http://127.0.0.1:8000/

The page (pixelllm_jax/static/index.html, one file) loads an image from your disk, takes a
box (drag) or a point (click) or an expression, and a task, and shows the answer drawn on the
image: each word at its point (hovering a word highlights its point), the referred box and
mask, and the answer's JSON, the same JSON `pixelllm-infer` writes (infer/inferencer.py).
The model flags are pixelllm-infer's (infer/loading.py: --checkpoint, --step, --gin_file,
--gin.NAME=VALUE, --tokenizer). Standard library HTTP server, bound to localhost by default;
one request runs the model at a time.

Routes:
  GET  /             the page
  GET  /api/info     the model (checkpoint, step, canvas) and the tasks with their prompts
  POST /api/answer   {"image": data URL or base64, "name", "task", "box" | "point" |
                     "expression"} -> {"answer": {...}, "mask_png": data URL or null};
                     a request that cannot be answered -> 400 {"error": message}
"""
import argparse
import base64
import http.server
import io
import json
import sys
import threading
from importlib import resources
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelllm_jax import cli, tasks
from pixelllm_jax.infer import inferencer as inferencer_lib
from pixelllm_jax.infer import loading
from pixelllm_jax.infer import requests as requests_lib
from pixelllm_jax.infer.requests import RequestError

MAX_BODY_BYTES = 64 << 20
_MASK_RGBA = (230, 30, 30, 110)


def page() -> bytes:
  return resources.files("pixelllm_jax").joinpath("static", "index.html").read_bytes()


def info(inferencer: inferencer_lib.Inferencer) -> dict[str, Any]:
  """What the page shows about the model and offers as tasks."""
  rows = []
  for name, prompt in requests_lib.PROMPTS.items():
    row = {"name": name, "prompt": prompt, "available": name in tasks.TASKS, "note": ""}
    if not row["available"]:
      row["note"] = f"no task {name!r} in this library"
    elif name == "refseg" and not inferencer.has_masks:
      row.update(available=False, note="not available in this model (no mask head)")
    elif name == "densecap" and not inferencer.has_boxes:
      row.update(available=False, note="not available in this model (no box decoder)")
    rows.append(row)
  for name, why in requests_lib.NOT_IMPLEMENTED.items():
    rows.append({"name": name, "prompt": "image", "available": False, "note": why})
  loaded = inferencer.loaded
  return {"checkpoint": loaded.source, "step": loaded.step, "canvas": inferencer.canvas_size,
          "tasks": rows}


def _mask_png(mask: np.ndarray) -> str:
  rgba = np.zeros((*mask.shape, 4), np.uint8)
  rgba[mask] = _MASK_RGBA
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def answer(inferencer: inferencer_lib.Inferencer, body: dict[str, Any]) -> dict[str, Any]:
  """The /api/answer response for a request body (RequestError for a bad one)."""
  name = str(body.get("name") or "uploaded image")
  data = body.get("image")
  if not isinstance(data, str) or not data:
    raise RequestError(f"{name}: no image was sent (load one first)")
  try:
    raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data,
                           validate=True)
    with Image.open(io.BytesIO(raw)) as image:
      pixels = inferencer_lib.pixels_of(image)
  except (ValueError, UnidentifiedImageError, OSError) as e:
    raise RequestError(f"{name}: cannot read the image: {e}") from e
  request = requests_lib.make_request(name, str(body.get("task", "")), box=body.get("box"),
                                      point=body.get("point"),
                                      expression=body.get("expression"), name=name)
  result = inferencer.answer(request, pixels)
  return {"answer": result.json,
          "mask_png": None if result.mask is None else _mask_png(result.mask)}


class Server(http.server.ThreadingHTTPServer):
  """The HTTP server holding one Inferencer; a lock runs one model call at a time."""
  daemon_threads = True

  def __init__(self, address: tuple[str, int], inferencer: inferencer_lib.Inferencer):
    super().__init__(address, _Handler)
    self.inferencer = inferencer
    self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
  server: Server

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, value: Any) -> None:
    self._send(status, json.dumps(value, allow_nan=False).encode(), "application/json")

  def do_GET(self):  # noqa: N802 (http.server's name)
    path = self.path.split("?", 1)[0]
    if path in ("/", "/index.html"):
      self._send(200, page(), "text/html; charset=utf-8")
    elif path == "/api/info":
      self._json(200, info(self.server.inferencer))
    else:
      self._json(404, {"error": f"no page {path}"})

  def do_POST(self):  # noqa: N802
    if self.path != "/api/answer":
      self._json(404, {"error": f"no route {self.path}"})
      return
    length = int(self.headers.get("Content-Length") or 0)
    if length > MAX_BODY_BYTES:
      self._json(413, {"error": f"request of {length} bytes; at most {MAX_BODY_BYTES}"})
      return
    try:
      body = json.loads(self.rfile.read(length) or b"{}")
      if not isinstance(body, dict):
        raise RequestError("the request body is not a JSON object")
      with self.server.lock:
        response = answer(self.server.inferencer, body)
    except (RequestError, json.JSONDecodeError) as e:
      self._json(400, {"error": str(e)})
      return
    except Exception as e:  # pylint: disable=broad-except  (the page shows it; the server stays)
      self._json(500, {"error": f"{type(e).__name__}: {e}"})
      raise
    self._json(200, response)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    sys.stderr.write(f"serve: {self.address_string()} {format % args}\n")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="pixelllm-serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  loading.add_arguments(p)
  p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
  p.add_argument("--port", type=int, default=8000, help="the port (0: any free one)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(cli.rewrite_gin_args(sys.argv[1:] if argv is None else argv))
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  try:
    loaded = loading.load_from_args(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"pixelllm-serve: cannot load the model: {e}", file=sys.stderr)
    return 2
  inferencer = inferencer_lib.Inferencer(loaded, args.max_decode_len, args.beam_size, args.alpha)
  server = Server((args.host, args.port), inferencer)
  host, port = server.server_address[:2]
  print(f"pixelllm-serve: {args.checkpoint} (step {loaded.step}) on http://{host}:{port}/",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


def run() -> None:
  """Console-script entry (`pixelllm-serve`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
