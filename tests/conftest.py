"""Test set-up: 8 fake CPU devices for mesh tests (compiled as xla_env.py says), absl flags
parsed for grain."""
import os

from xla_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
