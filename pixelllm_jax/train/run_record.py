"""What a run was configured with, kept beside its checkpoints, so that a resumed run or an
evaluation with a different configuration stops instead of silently mixing the two.

A record is a flat `{key: text}` mapping of everything that determines the results (the command
line builds it from the gin configuration and the tokenizer file; see `cli.startup_record`).
`MODEL_DIR/run_record.json` holds the record of the run that wrote the checkpoints:
- a training run that starts fresh writes it; one that resumes compares the current record with
  it and stops with `RunConfigChanged`, naming each key that changed (old -> new), unless the
  change is declared intended (`allow=True`: the differences are printed and the new record
  is kept, with the old one appended to `history`);
- an evaluation compares the keys that describe the model (and raises or prints likewise).
Keys that do not change results (where the data lives, the mesh, logging, checkpoint cadence,
rematerialization) are left out of records by the command line, so moving a run to another mesh
or device count simply works.
"""
import json
import os
from typing import Iterable, Mapping

FILE = "run_record.json"


class RunConfigChanged(ValueError):
  """The configuration differs from the one the model dir's checkpoints were made with."""


def load(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save(model_dir: str, record: Mapping[str, str], history: Iterable[Mapping] = ()) -> None:
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"record": dict(record), "history": list(history)}, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def differences(saved: Mapping[str, str], current: Mapping[str, str],
                keys: Iterable[str] | None = None) -> list[str]:
  """'key: old -> new' for every key (of `keys`, default all) whose text differs."""
  names = sorted(set(saved) | set(current)) if keys is None else sorted(keys)
  missing = "(not set)"
  return [f"{k}: {saved.get(k, missing)} -> {current.get(k, missing)}" for k in names
          if saved.get(k, missing) != current.get(k, missing)]


def check(model_dir: str, record: Mapping[str, str], *, what: str, allow: bool,
          keys: Iterable[str] | None = None, write: bool = False) -> list[str]:
  """Compares `record` with the model dir's; returns the differences.

  Args:
    what: the action, for the message ("resuming", "evaluating").
    allow: the change is intended: print the differences instead of raising.
    keys: compare only these keys (evaluation: the model's); default all.
    write: keep `record` as the model dir's record (training).
  """
  stored = load(model_dir)
  diffs = [] if stored is None else differences(stored["record"], record, keys)
  if diffs and not allow:
    listing = "\n  ".join(diffs)
    raise RunConfigChanged(
        f"{what} {model_dir} with a configuration that differs from the one its checkpoints "
        f"were made with ({os.path.join(model_dir, FILE)}):\n  {listing}\n"
        "Undo the change, use another MODEL_DIR, or pass --allow_config_change if it is "
        "intended (a changed batch size or mixture also changes which examples come next).")
  if diffs:
    print(f"{what} {model_dir} with an intended configuration change:\n  " + "\n  ".join(diffs),
          flush=True)
  if write:
    history = [] if stored is None else [*stored.get("history", []), stored["record"]]
    save(model_dir, record, history if diffs else (stored or {}).get("history", []))
  return diffs
