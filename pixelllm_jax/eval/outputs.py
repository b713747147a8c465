"""What the evaluation job writes under MODEL_DIR, and how it tells a finished step.

  eval/<step>/metrics.json   the step's metrics, written last: a step is done when this
                             file parses, names the step and covers every (task, split)
                             asked for (`is_done`)
  eval/<step>/<split>/       each task's predictions_<task>.jsonl and pictures on that split
  eval/summary.json          the best step per metric (summary.py)
  eval/events.*, eval/metrics.jsonl   TensorBoard scalars (train/metrics_writer.py)
  metrics.json               a copy of the highest evaluated step's metrics (the demo, the
                             sweep report and the end-to-end test read it); removed when an
                             evaluation fails, so an older one never passes for the result

Every JSON file is written whole or not at all (a temporary file renamed over it) and
strictly: a NaN or an infinity is an error naming the metric (`NonFiniteMetric`), never a
`NaN` token that strict JSON readers reject, and never silently a null.
"""
import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

LATEST = "metrics.json"
EVAL = "eval"
METRICS = "metrics.json"
SUMMARY = "summary.json"


class NonFiniteMetric(ValueError):
  """A metric is NaN or infinite; nothing is written for its step."""


def eval_dir(model_dir: str) -> str:
  return os.path.join(model_dir, EVAL)


def step_dir(model_dir: str, step: int) -> str:
  return os.path.join(model_dir, EVAL, str(int(step)))


def plain(value: Any) -> Any:
  """numpy scalars and arrays as Python numbers and lists (JSON-ready)."""
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, np.ndarray):
    return plain(value.tolist())
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.floating):
    return float(value)
  return value


def check_finite(values: Mapping[str, Any], where: str) -> None:
  """Raises `NonFiniteMetric` naming every NaN / infinite number in `values` (nested)."""
  bad = []

  def visit(name, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f"{name}.{k}" if name else str(k), v)
    elif isinstance(value, (list, tuple)):
      for i, v in enumerate(value):
        visit(f"{name}[{i}]", v)
    elif isinstance(value, float) and not math.isfinite(value):
      bad.append(f"{name} = {value}")

  visit("", plain(dict(values)))
  if bad:
    raise NonFiniteMetric(f"{where}: metrics that are not finite numbers: {', '.join(bad)} "
                          "(strict JSON has no NaN or infinity; nothing was written for it)")


def write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` strictly (no NaN / inf) and atomically (temp file + rename)."""
  value = plain(value)
  check_finite(value if isinstance(value, Mapping) else {"value": value}, path)
  text = json.dumps(value, indent=1, sort_keys=True, allow_nan=False)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str) -> Any | None:
  """The JSON value at `path`; None if the file is missing or does not parse."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_done(model_dir: str, step: int, splits: Mapping[str, Sequence[str]]) -> bool:
  """Whether eval/<step>/metrics.json is complete: it parses, names `step` and lists
  every (task, split) of `splits` as evaluated."""
  metrics = read_json(os.path.join(step_dir(model_dir, step), METRICS))
  if not isinstance(metrics, dict) or metrics.get("checkpoint_step") != int(step):
    return False
  done = metrics.get("splits")
  if not isinstance(done, dict):
    return False
  return all(set(wanted) <= set(done.get(task, ())) for task, wanted in splits.items())


def evaluated_steps(model_dir: str) -> list[int]:
  """Steps with an eval/<step>/metrics.json that parses and names its step, ascending."""
  root = eval_dir(model_dir)
  if not os.path.isdir(root):
    return []
  steps = []
  for name in os.listdir(root):
    if name.isdigit():
      metrics = read_json(os.path.join(root, name, METRICS))
      if isinstance(metrics, dict) and metrics.get("checkpoint_step") == int(name):
        steps.append(int(name))
  return sorted(steps)


def fresh_step_dir(model_dir: str, step: int) -> str:
  """An empty eval/<step>/ (what an earlier, unfinished or forced, evaluation left is
  removed: its pictures must not mix with the new ones)."""
  path = step_dir(model_dir, step)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  return path


def write_step(model_dir: str, step: int, metrics: Mapping[str, Any]) -> None:
  """eval/<step>/metrics.json (the step's completion mark: written after everything else)."""
  write_json(os.path.join(step_dir(model_dir, step), METRICS), metrics)


def write_latest(model_dir: str) -> int | None:
  """MODEL_DIR/metrics.json = the highest evaluated step's metrics; returns that step."""
  steps = evaluated_steps(model_dir)
  if not steps:
    return None
  write_json(os.path.join(model_dir, LATEST),
             read_json(os.path.join(step_dir(model_dir, steps[-1]), METRICS)))
  return steps[-1]


def remove_latest(model_dir: str) -> bool:
  """Removes MODEL_DIR/metrics.json (after a failure); whether there was one."""
  path = os.path.join(model_dir, LATEST)
  if os.path.exists(path):
    os.remove(path)
    return True
  return False
