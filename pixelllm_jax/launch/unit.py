"""One work unit: the training command, then (if asked) the evaluation command, with a status.

  python -m pixelllm_jax.launch.unit --model_dir=DIR [--evaluate] [--eval_arg=ARG ...] \\
      [--status_file=FILE] -- --gin_file=runs/demo.gin --gin.MODEL_DIR="'DIR'" ...

Every executor runs a unit through this module (the local one as a subprocess, xmanager as
the job's entry point), so a unit behaves the same everywhere. The arguments after `--` go
to `python -m pixelllm_jax.train` and, with the `--eval_arg`s added, to
`python -m pixelllm_jax.eval`. Both commands' output passes through to this process's.

The status file (JSON, rewritten at each change) holds `state`: 'training', 'evaluating',
'done', 'failed' (with the stage, its exit code and the last error line) or 'preempted'
(SIGTERM: training saved a checkpoint; running the unit again resumes it). A training that
exits 0 without reaching its last step (it was preempted) is 'preempted', never 'done'.

Exit code: 0 done, 75 preempted (run again to resume), otherwise the failing command's.
"""
import argparse
import collections
import datetime
import json
import os
import re
import signal
import subprocess
import sys
from typing import Any, Sequence

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: unfinished, run again


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def read_status(path: str) -> dict | None:
  """A status file's contents; None when there is none yet."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as error:
    raise ValueError(f"{path}: not a readable status file ({error})") from error


def write_status(path: str, data: dict[str, Any]) -> None:
  """Replaces the status file whole: readers never see half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


class Status:
  """The unit's status file (absent path: nothing written)."""

  def __init__(self, path: str | None, base: dict[str, Any]):
    self.path = path
    self.data = (read_status(path) if path else None) or {}  # the executor's fields
    self.data.update(base, message="", returncode=None)

  def set(self, **fields: Any) -> None:
    self.data.update(fields, updated=_now())
    if self.path is not None:
      write_status(self.path, self.data)


def _run(command: list[str], status: Status, stage: str, signals: dict) -> tuple[int, str]:
  """Runs one command, its output passed through; returns (exit code, last error line)."""
  print(f"[unit] {stage}: {' '.join(command)}", flush=True)
  child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, bufsize=1)
  signals["child"] = child
  if signals["term"]:  # SIGTERM came while it started
    child.send_signal(signal.SIGTERM)
  status.set(state=stage, pid=child.pid)
  tail: collections.deque[str] = collections.deque(maxlen=40)
  for line in child.stdout:
    sys.stdout.write(line)
    sys.stdout.flush()
    if line.strip():
      tail.append(line.rstrip())
  code = child.wait()
  signals["child"] = None
  error = _error_line(tail)
  if code < 0:
    error = f"killed by {signal.Signals(-code).name}; last output: {error}"
  return code, error


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")


def _error_line(lines: Sequence[str]) -> str:
  """The exception a command ended with (from its traceback's last part, message lines
  included), else the last line it printed."""
  lines = list(lines)
  starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
  if starts:
    after = lines[starts[-1]:]
    for i, line in enumerate(after):
      if _EXCEPTION_LINE.match(line):
        return " / ".join(after[i:])[-1000:]
  return lines[-1][-500:] if lines else ""


def _preempted(code: int, term: bool) -> bool:
  """Stopped by SIGTERM (before its handler was set: -15), not failing on its own."""
  return code == -signal.SIGTERM or (term and code == 0)


def _train_finished(model_dir: str) -> bool:
  try:
    with open(os.path.join(model_dir, "train_summary.json")) as f:
      return bool(json.load(f).get("finished"))
  except (OSError, ValueError):
    return False


def _stopped(status: Status, stage: str, code: int, error: str, term: bool) -> int:
  if _preempted(code, term) or (term and stage == "evaluating"):  # evaluation just reruns
    status.set(state="preempted", stage=stage, returncode=code, pid=None)
    return PREEMPTED_EXIT
  status.set(state="failed", stage=stage, returncode=code, message=error, pid=None)
  return code


def run_unit(model_dir: str, gin_args: list[str], *, evaluate: bool, eval_args: list[str],
             status_file: str | None) -> int:
  status = Status(status_file, {"model_dir": model_dir, "started": _now()})
  signals: dict[str, Any] = {"child": None, "term": False}

  def on_term(signum, frame):  # pylint: disable=unused-argument
    signals["term"] = True
    if signals["child"] is not None:
      signals["child"].send_signal(signal.SIGTERM)  # training saves, then exits 0

  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    python = sys.executable
    code, error = _run([python, "-m", "pixelllm_jax.train", *gin_args], status, "training",
                       signals)
    if code == 0 and not _train_finished(model_dir):
      status.set(state="preempted", pid=None, returncode=code)
      return PREEMPTED_EXIT
    if code != 0:
      return _stopped(status, "training", code, error, signals["term"])
    if evaluate and not signals["term"]:
      code, error = _run([python, "-m", "pixelllm_jax.eval", *gin_args, *eval_args], status,
                         "evaluating", signals)
      if code != 0:
        return _stopped(status, "evaluating", code, error, signals["term"])
    if signals["term"]:
      status.set(state="preempted", pid=None, returncode=PREEMPTED_EXIT)
      return PREEMPTED_EXIT
    status.set(state="done", pid=None, returncode=0, message="")
    return 0
  finally:
    signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    raise SystemExit("usage: python -m pixelllm_jax.launch.unit --model_dir=DIR [--evaluate] "
                     "[--eval_arg=ARG ...] [--status_file=FILE] -- TRAIN_ARGS...")
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m pixelllm_jax.launch.unit")
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--evaluate", action="store_true")
  parser.add_argument("--eval_arg", action="append", default=[])
  parser.add_argument("--status_file")
  flags = parser.parse_args(argv[:split])
  return run_unit(flags.model_dir, argv[split + 1:], evaluate=flags.evaluate,
                  eval_args=flags.eval_arg, status_file=flags.status_file)


if __name__ == "__main__":
  sys.exit(main())
