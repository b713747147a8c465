"""Test set-up: 8 fake CPU devices for mesh tests (compiled as xla_env.py says), one JAX
compilation cache for the whole run, absl flags parsed for grain."""
import os
import shutil
import tempfile

from xla_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs: the toy models' steps in several modules, the tiny
# demo's train step in every command a test starts (training, resuming, the sweep's units).
# One persistent cache, fresh for each run, shared by the xdist workers and every process they
# start (they inherit the variable; tests that want their own cache set it themselves). Only
# compiles over a second are stored (jax's default threshold).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pixelllm_tests_jax_cache_")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_sessionfinish(session, exitstatus):
  """The run's cache goes with it (removed by the process that made it: the xdist controller,
  or the single process without xdist)."""
  del exitstatus
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """The `slow` tests first, the longest of them (the end-to-end run, several minutes) leading.
  Under `-n 2` each worker runs its share in order: a long test that starts last keeps one
  worker busy after the other has finished; one that starts first overlaps the rest."""
  del config
  items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                               "test_end_to_end.py" not in item.nodeid))
