"""Inference requests: one image, a task and its prompt, read from the command line or a JSONL.

A request (`Request`) is an image file and a task with what that task reads besides the
image (`PROMPTS`): nothing (caption, trace, densecap), a box or a point (loca, refer_loca), or an
expression (refer, refseg). Coordinates are pixels of the image as stored (after its EXIF
orientation), x right, y down: a box [x0, y0, x1, y1], a point [x, y].

Inputs (`read_requests`): an image file, a folder (its images, sorted by name), or a JSONL
file with one request per line:
  {"image": "photos/cat.jpg", "task": "refer", "expression": "the cat on the left"}
  {"image": "photos/cat.jpg", "task": "loca", "box": [10, 20, 200, 180]}
  {"image": "photos/cat.jpg", "task": "loca", "point": [105, 100]}
A relative image path is read from the JSONL's folder; a line without "task" takes the
default task. A line that is not a JSON object becomes a failed request (`Failed`) that
names the line; so does a request whose checks fail (`check`), so one bad request never
stops a batch.
"""
import dataclasses
import json
import os
from typing import Any, Sequence

from pixelllm_jax import tasks

# What each task reads from a request besides the image. The slots built from it are the
# ones the task's own `make_slots` builds (tests/test_infer.py compares them):
#   'image': the whole image as the prompt box, the answer generated;
#   'region': a box (or a point: a box of size zero) as the prompt box, the answer generated;
#   'expression': "<instruction> <expression>" as the text prompt, the expression read by the
#     model (teacher forced) and the box read where it ends, as refer's evaluation does.
#   densecap: the whole image; the answer is the model's own regions, each captioned.
PROMPTS = {"caption": "image", "trace": "image", "loca": "region", "refer_loca": "region",
           "refer": "expression", "refseg": "expression", "densecap": "image"}
# Tasks of the paper that this library does not have yet (none today).
NOT_IMPLEMENTED: dict[str, str] = {}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")


class RequestError(ValueError):
  """A request that cannot be answered; the message names the request."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One image and a task with its prompt (module docstring). `name` says where the
  request came from, for messages ('line 3 of requests.jsonl: cat.jpg')."""
  image: str
  task: str
  box: tuple[float, float, float, float] | None = None
  point: tuple[float, float] | None = None
  expression: str | None = None
  name: str = ""

  def as_json(self) -> dict[str, Any]:
    out = {"image": self.image, "task": self.task}
    for key in ("box", "point", "expression"):
      if getattr(self, key) is not None:
        out[key] = (list(getattr(self, key)) if key != "expression" else self.expression)
    return out


@dataclasses.dataclass(frozen=True)
class Failed:
  """A request that could not even be read (its error names it)."""
  name: str
  error: str


def task_names() -> tuple[str, ...]:
  """The tasks a request may name: the registered ones that have a prompt here."""
  return tuple(t for t in tasks.TASKS if t in PROMPTS)


def check_task(request: Request) -> str:
  """The request's prompt kind ('image', 'region', 'expression'); RequestError for an unknown
  or unavailable task or a prompt the task does not take."""
  name = request.task
  if name in NOT_IMPLEMENTED:
    raise RequestError(f"{request.name}: {NOT_IMPLEMENTED[name]}")
  if name not in task_names():
    raise RequestError(f"{request.name}: unknown task {name!r}; known: {list(task_names())}")
  kind = PROMPTS[name]
  given = [k for k in ("box", "point", "expression") if getattr(request, k) is not None]
  if kind == "image" and given:
    raise RequestError(f"{request.name}: task {name!r} describes the whole image and takes no "
                       f"{' or '.join(given)}")
  if kind == "region":
    if request.expression is not None:
      raise RequestError(f"{request.name}: task {name!r} takes a box or a point, not an "
                         "expression")
    if (request.box is None) == (request.point is None):
      raise RequestError(f"{request.name}: task {name!r} needs a box [x0, y0, x1, y1] or a "
                         "point [x, y] (pixels), exactly one")
  if kind == "expression":
    if request.box is not None or request.point is not None:
      raise RequestError(f"{request.name}: task {name!r} takes an expression, not a box or "
                         "a point")
    if request.expression is None or not request.expression.strip():
      raise RequestError(f"{request.name}: task {name!r} needs a non-empty expression")
  return kind


def check_geometry(request: Request, width: int, height: int) -> None:
  """RequestError unless the box / point lies in the width x height image (a box with
  x0 < x1, y0 < y1)."""
  if request.box is not None:
    x0, y0, x1, y1 = request.box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
      raise RequestError(f"{request.name}: box {list(request.box)} is not inside the "
                         f"{width}x{height} image (need 0 <= x0 < x1 <= {width}, "
                         f"0 <= y0 < y1 <= {height})")
  if request.point is not None:
    x, y = request.point
    if not (0 <= x <= width and 0 <= y <= height):
      raise RequestError(f"{request.name}: point {list(request.point)} is outside the "
                         f"{width}x{height} image")


def _numbers(value: Any, count: int, what: str, name: str) -> tuple[float, ...] | None:
  if value is None:
    return None
  try:
    numbers = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    numbers = ()
  if len(numbers) != count or not all(n == n and abs(n) != float("inf") for n in numbers):
    raise RequestError(f"{name}: {what} must be {count} finite numbers, got {value!r}")
  return numbers


def make_request(image: str, task: str, *, box: Any = None, point: Any = None,
                 expression: str | None = None, name: str = "") -> Request:
  """A Request with its coordinates read as numbers (RequestError naming `name` if not)."""
  name = name or image
  if expression is not None and not isinstance(expression, str):
    raise RequestError(f"{name}: expression must be a string, got {expression!r}")
  return Request(image=str(image), task=str(task), box=_numbers(box, 4, "box", name),
                 point=_numbers(point, 2, "point", name), expression=expression, name=name)


def _from_line(line: str, number: int, path: str, default_task: str) -> Request | Failed:
  where = f"line {number} of {os.path.basename(path)}"
  try:
    row = json.loads(line)
    if not isinstance(row, dict):
      raise RequestError(f"{where}: not a JSON object: {line.strip()[:80]}")
    unknown = sorted(set(row) - {"image", "task", "box", "point", "expression"})
    if unknown:
      raise RequestError(f"{where}: unknown keys {unknown} (known: image, task, box, point, "
                         "expression)")
    if not isinstance(row.get("image"), str) or not row["image"]:
      raise RequestError(f"{where}: no \"image\" path")
    image = row["image"]
    if not os.path.isabs(image):
      image = os.path.join(os.path.dirname(os.path.abspath(path)), image)
    return make_request(image, row.get("task", default_task), box=row.get("box"),
                        point=row.get("point"), expression=row.get("expression"),
                        name=f"{where} ({row['image']})")
  except json.JSONDecodeError as e:
    return Failed(where, f"{where}: not valid JSON ({e.msg} at column {e.colno})")
  except RequestError as e:
    return Failed(where, str(e))


def read_requests(source: str, task: str, *, box: Sequence[float] | None = None,
                  point: Sequence[float] | None = None,
                  expression: str | None = None) -> list[Request | Failed]:
  """The requests of `source` (module docstring). For an image or a folder, every image gets
  `task` and the prompt given; a JSONL gives its own (`task` is the default)."""
  if source.endswith(".jsonl"):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"requests file {source} not found")
    with open(source) as f:
      lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    return [_from_line(line, number, source, task) for number, line in lines]
  if os.path.isdir(source):
    images = sorted(os.path.join(source, n) for n in os.listdir(source)
                    if n.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {source}")
  elif os.path.exists(source):
    images = [source]
  else:
    raise FileNotFoundError(f"input {source} not found (an image, a folder or a .jsonl)")
  out: list[Request | Failed] = []
  for image in images:
    try:
      out.append(make_request(image, task, box=box, point=point, expression=expression,
                              name=os.path.basename(image)))
    except RequestError as e:
      out.append(Failed(os.path.basename(image), str(e)))
  return out
