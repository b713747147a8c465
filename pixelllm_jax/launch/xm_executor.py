"""The xmanager executor: the sweep's work units as jobs of one xmanager experiment.

Each work unit becomes one job running `python -m pixelllm_jax.launch.unit` (the same unit
runner as the local executor: training, then evaluation when the sweep asks) in a container
built from this repository, on the accelerator the sweep's `Resources` name. Its model dir
is `<root>/<unit>`. Every path a unit reads or writes (root, data, checkpoints, tokenizer) must
be a file system path the job sees: the project reads and writes with Python's `open`, so use
the Cloud Storage FUSE mount Vertex AI jobs have (`/gcs/<bucket>/...`), not `gs://` URLs. One
job is one host: multi-host units (a TPU slice over several hosts) need the multi-process
start-up of the scale work and are not supported by the unit runner yet.

`jobs()` describes the jobs without xmanager; `dry_run` prints them. `launch()` needs the
optional extra: `pip install -e .[launch]` (xmanager), and its cloud set-up.
"""
import dataclasses
import os
import shlex
from typing import Callable

from pixelllm_jax.launch.local import unit_command
from pixelllm_jax.launch.sweep import Resources, Sweep

REPOSITORY = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
ENTRYPOINT = "pixelllm_jax.launch.unit"


@dataclasses.dataclass(frozen=True)
class Job:
  """What one xmanager job runs and where."""
  name: str
  resources: Resources
  module: str
  args: tuple[str, ...]

  def describe(self) -> str:
    accelerator = f"{self.resources.accelerator} {self.resources.topology}"
    command = shlex.join(["python", "-m", self.module, *self.args])
    return f"job {self.name}\n  executor: Vertex ({accelerator})\n  command: {command}"


def jobs(sweep: Sweep, root: str) -> list[Job]:
  out = []
  for unit in sweep.units:
    command = unit_command(sweep, unit, _join(root, unit.name))
    assert command[:3] == ["python", "-m", ENTRYPOINT]
    out.append(Job(unit.name, sweep.resources, ENTRYPOINT, tuple(command[3:])))
  return out


def _join(root: str, name: str) -> str:
  return root.rstrip("/") + "/" + name


def dry_run(sweep: Sweep, root: str, log: Callable[[str], None] = print) -> list[Job]:
  """Prints the experiment's jobs and their commands; needs neither xmanager nor a cloud."""
  described = jobs(sweep, root)
  log(f"xmanager experiment {sweep.name!r}: {len(described)} jobs (dry run, nothing launched)")
  for job in described:
    log(job.describe())
  return described


def requirements(xm, resources: Resources):
  """xm.JobRequirements for the sweep's resources (e.g. TPU_V5E '4x4', A100 '8')."""
  name = resources.accelerator.upper()
  if name not in xm.ResourceType.__members__:
    raise ValueError(f"xmanager knows no accelerator {resources.accelerator!r}; it knows "
                     f"{sorted(xm.ResourceType.__members__)}")
  value = resources.topology if name.startswith("TPU") else int(resources.topology)
  return xm.JobRequirements(**{name: value})


def launch(sweep: Sweep, root: str) -> None:
  """Creates the experiment and adds one job per work unit (xmanager and its set-up needed)."""
  try:
    from xmanager import xm, xm_local  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise SystemExit("the xmanager executor needs the optional extra: pip install -e "
                     f".[launch] ({error}); --dry_run shows the jobs without it") from error
  described = jobs(sweep, root)
  with xm_local.create_experiment(experiment_title=sweep.name) as experiment:
    [executable] = experiment.package([
        xm.python_container(executor_spec=xm_local.Vertex.Spec(), path=REPOSITORY,
                            entrypoint=xm.ModuleName(ENTRYPOINT))])
    for job in described:
      experiment.add(xm.Job(executable, name=job.name, args=list(job.args),
                            executor=xm_local.Vertex(requirements=requirements(
                                xm, job.resources))))
