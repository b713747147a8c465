"""The launcher every sweep file calls: `launcher.run(SWEEP)` under `if __name__ == "__main__"`.

  python launch/world_lr_seed.py                          # local executor, --parallel=1
  python launch/world_lr_seed.py --parallel=2             # two units at a time
  python launch/world_lr_seed.py --report                 # the report now (also while it runs)
  python launch/world_lr_seed.py --executor=xm --dry_run  # the xmanager jobs, launching nothing
  python launch/world_lr_seed.py --executor=xm --root=/gcs/bucket/sweeps/x   # xmanager

Flags (absl, so `xmanager launch launch/x.py -- --executor=xm ...` works too):
  --executor   local | xm
  --root       the sweep's folder: one MODEL_DIR per work unit (default runs/sweeps/<name>)
  --parallel   local: units run at once (each training uses every core it is given: on a
               small machine 1 is fastest overall)
  --units      only this work unit (repeatable)
  --report     print the report of --root and exit
  --dry_run    xm: print the jobs and commands without xmanager or a cloud

Exit code (local): 0 when every unit is done, 1 otherwise (the report names the states).
"""
import dataclasses
import os
import sys
from typing import Callable

from absl import app, flags

from pixelllm_jax.launch import local, report, xm_executor
from pixelllm_jax.launch.sweep import Sweep

FLAGS = flags.FLAGS
flags.DEFINE_enum("executor", "local", ["local", "xm"], "Where the work units run.")
flags.DEFINE_string("root", None, "The sweep's folder (default runs/sweeps/<sweep name>).")
flags.DEFINE_integer("parallel", 1, "Local executor: work units run at once.")
flags.DEFINE_multi_string("units", None, "Only this work unit (repeatable; its name).")
flags.DEFINE_bool("report", False, "Print the sweep report and exit.")
flags.DEFINE_bool("dry_run", False, "xm executor: print the jobs, launch nothing.")


def select(sweep: Sweep, names: list[str] | None) -> Sweep:
  if not names:
    return sweep
  return dataclasses.replace(sweep, units=[sweep.unit(n) for n in names])


def execute(sweep: Sweep) -> int:
  """What the flags ask for, on the sweep; returns the exit code."""
  root = FLAGS.root or os.path.join("runs", "sweeps", sweep.name)
  sweep = select(sweep, FLAGS.units)
  if FLAGS.report:
    return report.main([root])
  if FLAGS.executor == "xm":
    if FLAGS.dry_run:
      xm_executor.dry_run(sweep, root)
    else:
      xm_executor.launch(sweep, root)
    return 0
  if FLAGS.dry_run:
    for unit in sweep.units:
      print(unit.name + ": " + " ".join(local.unit_command(
          sweep, unit, os.path.join(root, unit.name))))
    return 0
  states = local.LocalExecutor(root, FLAGS.parallel).run(sweep)
  print(report.table(report.collect(root)))
  print(f"(report: {os.path.join(root, 'report.txt')}, {os.path.join(root, 'report.csv')})")
  return 0 if all(s == "done" for s in states.values()) else 1


def run(sweep: Sweep | Callable[[], Sweep]) -> None:
  """Parses the flags and runs the sweep (the entry of every launch/ file). A function that
  makes the sweep is called after the flags are parsed (so it may read the file's own flags)."""

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    sys.exit(execute(sweep if isinstance(sweep, Sweep) else sweep()))

  app.run(main)
