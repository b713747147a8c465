"""The task registry: one `Task` per task (tasks/base.py says what a Task holds).

`TASKS` (the names, in registration order) and `TASK_ID` (name -> the id that
`Batch.task_ids` carries) derive from it, as does every per-task table of the
library (builders, slot functions, augmentation, loss terms, evaluation).
Registration order fixes the ids: append new tasks, never reorder.

Adding a task: write `tasks/<name>.py` defining its slot function, evaluation
and `TASK = base.Task(...)`, then register it below (docs/MAP.md).
"""
from pixelllm_jax.tasks import (  # noqa: F401
    base, caption, densecap, loca, refer, refer_loca, refseg, trace)
from pixelllm_jax.tasks.base import Slot, Task, TaskConfig, TextEncoder  # noqa: F401

_REGISTRY: dict[str, Task] = {}


def _register(task: Task) -> Task:
  if task.name in _REGISTRY:
    raise ValueError(f"task {task.name!r} is registered twice")
  _REGISTRY[task.name] = task
  return task


for _task in (caption.TASK, trace.TASK, refer.TASK, loca.TASK, refer_loca.TASK, refseg.TASK,
              densecap.TASK):
  _register(_task)

TASKS: tuple[str, ...] = tuple(_REGISTRY)
TASK_ID: dict[str, int] = {name: i for i, name in enumerate(TASKS)}


def get(name: str) -> Task:
  """The registered task `name`; a clear error for an unknown one."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; known: {list(TASKS)}")
  return _REGISTRY[name]


def check_names(names, where: str) -> None:
  """Raises naming `where` if any of `names` is not a registered task."""
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    raise ValueError(f"{where}: unknown tasks {unknown}; known: {list(TASKS)}")


def make_slots(name: str, record: dict, tokenizer: TextEncoder, config: TaskConfig) -> list[Slot]:
  """All slots of `record` for task `name`, in record order."""
  return get(name).make_slots(record, tokenizer, config)
