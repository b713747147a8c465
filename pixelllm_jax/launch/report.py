"""The sweep report: one row per work unit (bindings, state, last step, final metrics).

  python -m pixelllm_jax.launch.report runs/sweeps/world_lr_seed   # prints it, writes the CSV

It reads only the sweep's folder, so it works while the sweep runs and from another machine:
each unit's `status.json` (state, bindings), the last line of `train/metrics.jsonl` (the step
training reached) and `metrics.json` (the evaluation's metrics, when the unit evaluated).
"""
import csv
import glob
import json
import math
import os
import sys
import tempfile
from typing import Any

FIXED = ("unit", "state", "step")


def _last_line(path: str) -> dict[str, Any]:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 65536))
      lines = [line for line in f.read().splitlines() if line.strip()]
  except FileNotFoundError:
    return {}
  for line in reversed(lines):  # the last complete line (a writer may be mid-line)
    try:
      return json.loads(line)
    except ValueError:
      continue
  return {}


def _json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return {}


def collect(root: str) -> list[dict[str, Any]]:
  """One dict per unit folder under `root` (those with a status.json), sorted by name."""
  rows = []
  for status_path in sorted(glob.glob(os.path.join(root, "*", "status.json"))):
    unit_dir = os.path.dirname(status_path)
    status = _json(status_path)
    row: dict[str, Any] = {"unit": status.get("unit", os.path.basename(unit_dir)),
                           "state": status.get("state", "?")}
    if status.get("state") == "failed" and status.get("message"):
      row["message"] = status["message"]
    row["step"] = _last_line(os.path.join(unit_dir, "train", "metrics.jsonl")).get("step", "")
    row.update({k: v for k, v in status.get("bindings", {}).items()})
    for name, value in sorted(_json(os.path.join(unit_dir, "metrics.json")).items()):
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        row[f"metric:{name}"] = value
    rows.append(row)
  return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
  names = list(FIXED)
  for row in rows:
    names += [k for k in row if k not in names and not k.startswith("metric:")
              and k != "message"]
  for row in rows:
    names += [k for k in row if k not in names and k.startswith("metric:")]
  return names + (["message"] if any("message" in r for r in rows) else [])


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  return str(value)


def table(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table (metric columns without their 'metric:' prefix)."""
  if not rows:
    return "(no work units yet)"
  names = columns(rows)
  head = [n.removeprefix("metric:") for n in names]
  body = [[_cell(row.get(n, "")) for n in names] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
  counts: dict[str, int] = {}
  for row in rows:
    counts[row["state"]] = counts.get(row["state"], 0) + 1
  lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
  return "\n".join(line.rstrip() for line in lines)


def write(root: str) -> list[dict[str, Any]]:
  """Writes root/report.txt and root/report.csv (each replaced whole); returns the rows."""
  rows = collect(root)
  names = columns(rows)
  for name, write_fn in (("report.csv", _write_csv), ("report.txt", _write_txt)):
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.")  # one per writer
    with os.fdopen(fd, "w", newline="") as f:
      write_fn(f, rows, names)
    os.replace(tmp, os.path.join(root, name))
  return rows


def _write_csv(f, rows, names) -> None:
  writer = csv.DictWriter(f, fieldnames=names)
  writer.writeheader()
  for row in rows:
    writer.writerow({n: row.get(n, "") for n in names})


def _write_txt(f, rows, names) -> None:  # pylint: disable=unused-argument
  f.write(table(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print("usage: python -m pixelllm_jax.launch.report SWEEP_ROOT", file=sys.stderr)
    return 2
  if not os.path.isdir(argv[0]):
    print(f"{argv[0]}: no such sweep folder", file=sys.stderr)
    return 2
  write(argv[0])
  print(table(collect(argv[0])))
  print(f"(CSV: {os.path.join(argv[0], 'report.csv')})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
