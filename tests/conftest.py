"""Test set-up: 8 fake CPU devices for mesh tests (compiled as xla_env.py says), absl flags
parsed for grain."""
import os

from xla_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
  """The `slow` tests first, the longest of them (the end-to-end run, several minutes) leading.
  Under `-n 2` each worker runs its share in order: a long test that starts last keeps one
  worker busy after the other has finished; one that starts first overlaps the rest."""
  del config
  items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                               "test_end_to_end.py" not in item.nodeid))
