"""The local executor: a sweep's work units as subprocesses on this machine, N at a time.

Layout under the sweep's root (default `runs/sweeps/<sweep name>`):
  <unit>/             the unit's MODEL_DIR (checkpoints, train/, metrics.json, ...)
  <unit>/status.json  its state ('pending', 'training', 'evaluating', 'done', 'failed',
                      'preempted'), bindings and command (written by launch/unit.py)
  <unit>/launch.log   everything its commands printed
  report.txt, report.csv  the sweep report, rewritten whenever a unit changes state

The report is rewritten when a unit starts or ends and every 10 s while units run. A failing
unit does not stop the others. Running the sweep again skips the units that are done and runs
the others again: training resumes from their latest checkpoint. A unit whose folder holds a
run with other arguments than the sweep now gives is an error (its folder would mix two
configurations): delete the folder or choose another root. One launcher per root (a lock).
SIGTERM or Ctrl-C stops the launcher cleanly: each running unit gets SIGTERM (training saves a
checkpoint) and is left 'preempted', to resume on the next run; a second signal kills them.
"""
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from pixelllm_jax.launch import report as report_lib
from pixelllm_jax.launch.sweep import Sweep, WorkUnit
from pixelllm_jax.launch.unit import read_status, write_status

REPORT_SECONDS = 10.0  # the report is also rewritten this often while units run
STOP_SECONDS = 120.0   # how long a failing launcher waits for its units to save and stop


def unit_command(sweep: Sweep, unit: WorkUnit, model_dir: str,
                 status_file: str | None = None) -> list[str]:
  """The command that runs one work unit (launch/unit.py), as every executor runs it."""
  command = ["python", "-m", "pixelllm_jax.launch.unit", f"--model_dir={model_dir}"]
  if status_file:
    command.append(f"--status_file={status_file}")
  if sweep.evaluate:
    command.append("--evaluate")
    train_args = set(sweep.gin_args(unit, model_dir))
    command += [f"--eval_arg={a}" for a in sweep.gin_args(unit, model_dir, evaluation=True)
                if a not in train_args]
  return command + ["--", *sweep.gin_args(unit, model_dir)]


class LocalExecutor:
  """Runs work units as subprocesses, `parallel` at a time."""

  def __init__(self, root: str, parallel: int = 1, poll_seconds: float = 0.5,
               log: Callable[[str], None] = print):
    if parallel < 1:
      raise ValueError(f"parallel must be >= 1, got {parallel}")
    self.root, self.parallel, self.poll_seconds, self.log = root, parallel, poll_seconds, log
    self._stop = False

  def paths(self, unit: WorkUnit) -> tuple[str, str, str]:
    model_dir = os.path.join(self.root, unit.name)
    return model_dir, os.path.join(model_dir, "status.json"), os.path.join(model_dir,
                                                                           "launch.log")

  def run(self, sweep: Sweep) -> dict[str, str]:
    """Runs every unfinished unit; returns each unit's final state."""
    os.makedirs(self.root, exist_ok=True)
    with open(os.path.join(self.root, "launcher.lock"), "a+") as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise RuntimeError(f"another launcher is running the sweep under {self.root}; "
                           "wait for it, stop it, or give another --root") from None
      return self._run(sweep)

  def _run(self, sweep: Sweep) -> dict[str, str]:
    self._stop, self._signals = False, 0
    todo = self._prepare(sweep)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, self._on_stop) for s in (signal.SIGTERM, signal.SIGINT)
                if in_main_thread}  # (signal handlers can only be set there)
    stopped: set[str] = set()
    last_report = time.time()
    try:
      while todo or running:
        while todo and len(running) < self.parallel and not self._stop:
          unit = todo.pop(0)
          running[unit.name] = self._start(sweep, unit)
        if self._stop:
          todo = []
          self._stop_units(running, stopped, kill=self._signals > 1)
        for name, (proc, log_file) in list(running.items()):
          if proc.poll() is not None:
            log_file.close()
            del running[name]
            self._finished(sweep.unit(name), proc.returncode)
        if time.time() - last_report > REPORT_SECONDS:
          report_lib.write(self.root)
          last_report = time.time()
        time.sleep(self.poll_seconds)
    except BaseException:
      # The launcher itself fails: its units must not run on unmanaged.
      self._stop_units(running, stopped, kill=False)
      for proc, _ in running.values():
        try:
          proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
          os.killpg(proc.pid, signal.SIGKILL)
      raise
    finally:
      for s, handler in handlers.items():
        signal.signal(s, handler)
    states = {u.name: (read_status(self.paths(u)[1]) or {}).get("state", "pending")
              for u in sweep.units}
    report_lib.write(self.root)
    return states

  def _on_stop(self, signum, frame):  # pylint: disable=unused-argument
    self._signals += 1
    if self._signals == 1:
      self.log(f"[sweep] {signal.Signals(signum).name}: stopping the running units "
               "(they save a checkpoint; run the sweep again to resume; a second signal "
               "kills them)")
    self._stop = True

  @staticmethod
  def _stop_units(running, stopped: set[str], *, kill: bool) -> None:
    """SIGTERM to each running unit once (a second could cut its final save); SIGKILL to
    its whole process group when `kill`."""
    for name, (proc, _) in running.items():
      if proc.poll() is not None:
        continue
      if kill:
        os.killpg(proc.pid, signal.SIGKILL)
      elif name not in stopped:
        proc.send_signal(signal.SIGTERM)
        stopped.add(name)

  def _prepare(self, sweep: Sweep) -> list[WorkUnit]:
    """Units still to run; checks finished ones were run with today's arguments."""
    todo, changed = [], []
    for unit in sweep.units:
      model_dir, status_file, _ = self.paths(unit)
      status = read_status(status_file)
      command = unit_command(sweep, unit, model_dir, status_file)
      if status is not None and status.get("command") not in (None, command):
        changed.append(unit.name)
        continue
      if status is not None and status.get("state") == "done":
        self.log(f"[sweep] {unit.name}: done, skipped")
        continue
      os.makedirs(model_dir, exist_ok=True)
      if status is None or status.get("state") == "pending":
        write_status(status_file, {"state": "pending", "unit": unit.name,
                                         "bindings": _plain(unit.bindings),
                                         "command": command})
      todo.append(unit)
    if changed:
      raise ValueError(
          f"work units {changed} under {self.root} were run with other arguments than "
          "the sweep gives now (their status.json has the command); delete their folders "
          "or run the sweep under another --root")
    report_lib.write(self.root)
    return todo

  def _start(self, sweep: Sweep, unit: WorkUnit):
    model_dir, status_file, log_path = self.paths(unit)
    command = unit_command(sweep, unit, model_dir, status_file)
    previous = read_status(status_file) or {}
    attempt = int(previous.get("attempt", 0)) + 1
    write_status(status_file, {"state": "starting", "unit": unit.name,
                                     "bindings": _plain(unit.bindings), "command": command,
                                     "attempt": attempt})
    log_file = open(log_path, "a")  # pylint: disable=consider-using-with
    log_file.write(f"\n==== attempt {attempt}: {' '.join(command)}\n")
    log_file.flush()
    self.log(f"[sweep] {unit.name}: started (attempt {attempt}), log {log_path}")
    proc = subprocess.Popen([sys.executable, *command[1:]], stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    report_lib.write(self.root)
    return proc, log_file

  def _finished(self, unit: WorkUnit, code: int) -> None:
    _, status_file, log_path = self.paths(unit)
    status = read_status(status_file) or {}
    if status.get("state") not in ("done", "failed", "preempted"):
      # The unit runner died before recording an end: record it here (SIGTERM before its
      # handler was set is a preemption; anything else a failure).
      state = "preempted" if code == -signal.SIGTERM else "failed"
      status.update(state=state, returncode=code,
                    message=f"the unit's process ended with exit code {code}", pid=None)
      write_status(status_file, status)
    detail = f" ({status.get('stage')}: {status.get('message')})" \
        if status["state"] == "failed" else ""
    self.log(f"[sweep] {unit.name}: {status['state']}{detail}; log {log_path}")
    report_lib.write(self.root)


def _plain(bindings) -> dict:
  return {k: (v.text if hasattr(v, "text") else v) for k, v in bindings.items()}
