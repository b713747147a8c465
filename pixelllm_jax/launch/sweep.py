"""A sweep: gin files, shared bindings, and work units (a product / zip of values over bindings).

Written the way xmanager launch scripts write hyper-parameter sweeps:

  units = sweep.product(sweep.axis("lr", "make_optimizer.learning_rate", [1e-3, 3e-3]),
                        sweep.axis("seed", "train.seed", [0, 1]))
  SWEEP = sweep.Sweep(name="world_lr_seed", gin_files=("runs/demo.gin",),
                      bindings={"TRAIN_STEPS": 500}, units=units, evaluate=True)

Each work unit has a name made from its axes' short names and values ("lr=0.001,seed=0"),
used as its folder under the sweep's root (its MODEL_DIR). Values are Python values written
into gin as literals (`repr`); `Gin("@foo()")` passes gin text as it is (a reference,
a macro). Nothing here runs anything: executors (local.py, xm.py) do.
"""
import dataclasses
import itertools
import re
from typing import Any, Iterable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Gin:
  """Gin text bound as it is (e.g. `Gin("%OTHER_MACRO")`), not as a Python literal."""
  text: str


def gin_literal(value: Any) -> str:
  """A Python value as gin source text."""
  if isinstance(value, Gin):
    return value.text
  if isinstance(value, (bool, int, float, str, type(None))):
    return repr(value)
  if isinstance(value, (tuple, list)):
    inner = ", ".join(gin_literal(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
  raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a gin value; "
                  "use Gin('...') for gin text")


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """One run of the sweep: its name (a folder name) and its own bindings."""
  name: str
  bindings: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Axis:
  """Values of one or more gin bindings varied together; `short` names it in unit names."""
  short: str
  values: tuple[Mapping[str, Any], ...]
  labels: tuple[str, ...]


def axis(short: str, binding: str, values: Iterable[Any]) -> Axis:
  """One binding over values: axis("lr", "make_optimizer.learning_rate", [1e-3, 3e-3])."""
  values = tuple(values)
  if not values:
    raise ValueError(f"axis {short!r}: no values")
  return Axis(short, tuple({binding: v} for v in values), tuple(_label(v) for v in values))


def product(*axes: Axis) -> list[WorkUnit]:
  """Every combination of the axes' values (the first axis varies slowest)."""
  return _units(axes, itertools.product(*(range(len(a.values)) for a in axes)))


def zip_(*axes: Axis) -> list[WorkUnit]:
  """The axes' values taken together, position by position (all of one length)."""
  lengths = {a.short: len(a.values) for a in axes}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zip_ needs axes of one length, got {lengths}")
  n = next(iter(lengths.values()), 0)
  return _units(axes, ((i,) * len(axes) for i in range(n)))


def _units(axes: Sequence[Axis], positions: Iterable[tuple[int, ...]]) -> list[WorkUnit]:
  shorts = [a.short for a in axes]
  if len(set(shorts)) != len(shorts):
    raise ValueError(f"two axes share a short name: {shorts}")
  units = []
  for index in positions:
    bindings, parts = {}, []
    for a, i in zip(axes, index):
      for key in a.values[i]:
        if key in bindings:
          raise ValueError(f"binding {key} is set by two axes")
      bindings.update(a.values[i])
      parts.append(f"{a.short}={a.labels[i]}")
    units.append(WorkUnit(",".join(parts), bindings))
  return units


def _label(value: Any) -> str:
  text = value.text if isinstance(value, Gin) else (
      f"{value:g}" if isinstance(value, float) else str(value))
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one work unit asks a cluster for (the xmanager executor; local runs ignore it).

  `accelerator`: an xmanager resource name such as 'TPU_V5E', 'TPU_V4', 'A100', 'H100';
  `topology`: a TPU topology ('4x4', '2x2x4') or a GPU count ('8').
  """
  accelerator: str = "A100"
  topology: str = "8"


@dataclasses.dataclass(frozen=True)
class Sweep:
  """gin files and bindings every unit shares, the units, and what each unit runs.

  `evaluate`: after training, each unit runs the evaluation job on its model dir.
  `eval_bindings`: bindings for the evaluation only (e.g. the tasks it evaluates).
  """
  name: str
  gin_files: tuple[str, ...]
  units: Sequence[WorkUnit]
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  evaluate: bool = False
  resources: Resources = Resources()

  def __post_init__(self):
    if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
      raise ValueError(f"sweep name {self.name!r}: use letters, digits, '.', '_', '-'")
    names = [u.name for u in self.units]
    if not names:
      raise ValueError(f"sweep {self.name}: no work units")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"sweep {self.name}: work units share names {duplicates}")
    for unit in self.units:
      if "MODEL_DIR" in unit.bindings or "MODEL_DIR" in self.bindings:
        raise ValueError("MODEL_DIR is set by the launcher (one folder per work unit)")

  def unit(self, name: str) -> WorkUnit:
    for unit in self.units:
      if unit.name == name:
        return unit
    raise KeyError(f"sweep {self.name} has no work unit {name!r}; it has "
                   f"{[u.name for u in self.units]}")

  def gin_args(self, unit: WorkUnit, model_dir: str, *, evaluation: bool = False) -> list[str]:
    """The command-line arguments of the unit's train (or eval) command."""
    bindings = {**self.bindings, **unit.bindings, **(self.eval_bindings if evaluation else {})}
    args = [f"--gin_file={f}" for f in self.gin_files]
    args.append(f"--gin.MODEL_DIR={gin_literal(model_dir)}")
    args += [f"--gin.{k}={gin_literal(v)}" for k, v in bindings.items()]
    return args
