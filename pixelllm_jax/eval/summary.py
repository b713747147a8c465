"""eval/summary.json: for every metric, which direction is better and the step that did best.

Directions come from the metric's name less its task prefix (`refer_`) and split suffix
(`/testA`), matched whole against the table below:
- higher is better: P@x (`p@0.5`), IoU variants (`mean_iou`, `ciou`, `miou`), accuracies
  (`pointing_acc`), `exact_match`, the caption scores (CIDEr, METEOR, BLEU, ROUGE, SPICE),
  mAP, precision and recall;
- lower is better: distances and losses (`l1` as in trace L1, `*_loss`, `*_error`);
- not ranked: sizes and timings (`*_count`, `images`, `*_words`, `*_seconds`,
  `checkpoint_step`).
A metric the table does not know is listed under `unranked` rather than guessed at.
Ties go to the earliest step.

  {"steps": [1000, 2000], "latest_step": 2000,
   "metrics": {"trace_l1": {"better": "lower", "best_step": 2000, "best": 0.071,
                            "latest": 0.071, "steps": 2}, ...},
   "unranked": [...]}
"""
import re
from typing import Any, Mapping

from pixelllm_jax import tasks as task_registry

HIGHER, LOWER = "higher", "lower"
_RULES = (
    (re.compile(r"count|\w*_count|images|\w*words|\w*seconds|checkpoint_step"), None),
    (re.compile(r"\w*l1|\w*loss|\w*error"), LOWER),
    (re.compile(r"p@[\d.]+|\w*iou|\w*acc|accuracy|exact_match|cider\w*|meteor|bleu\w*|"
                r"rouge\w*|spice|\w*map|precision|recall"), HIGHER),
)
_UNKNOWN = "unknown"


def base_name(metric: str) -> str:
  """'refer_p@0.5/testA' -> 'p@0.5'; 'eval_seconds' -> 'eval_seconds'."""
  name = metric.split("/")[0]
  for task in task_registry.TASKS:
    if name.startswith(task + "_"):
      return name[len(task) + 1:]
  return name


def direction(metric: str) -> str | None:
  """HIGHER, LOWER, None (not a quality metric) or 'unknown'."""
  name = base_name(metric)
  for pattern, better in _RULES:
    if pattern.fullmatch(name):
      return better
  return _UNKNOWN


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(per_step: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
  """The summary of `{step: metrics}` (module docstring)."""
  steps = sorted(per_step)
  ranked, unranked = {}, set()
  names = sorted({k for m in per_step.values() for k, v in m.items() if _is_number(v)})
  for name in names:
    better = direction(name)
    if better is None:
      continue
    if better == _UNKNOWN:
      unranked.add(name)
      continue
    values = [(s, per_step[s][name]) for s in steps if _is_number(per_step[s].get(name))]
    sign = 1.0 if better == HIGHER else -1.0
    best_step, best = values[0]
    for step, value in values[1:]:
      if sign * value > sign * best:
        best_step, best = step, value
    ranked[name] = {"better": better, "best_step": best_step, "best": best,
                    "latest": values[-1][1], "steps": len(values)}
  return {"steps": steps, "latest_step": steps[-1] if steps else None, "metrics": ranked,
          "unranked": sorted(unranked)}
