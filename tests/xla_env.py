"""XLA flags for the tests (in-process via conftest.py, and for the commands tests start).

The tests compile hundreds of small programs and run few steps of each, so they ask XLA's CPU
backend for its lowest optimization level: on the 2-core machine this halved the time of
test_model + test_t5 (120 s -> 70 s) with every test passing either way. It changes how the
compiled code is optimized, not what it computes. `PIXELLLM_TEST_XLA_OPT=default` runs the
suite with XLA's default optimization instead.
"""
import os

FAST_COMPILE = ("" if os.environ.get("PIXELLLM_TEST_XLA_OPT") == "default"
                else " --xla_backend_optimization_level=0")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` fake CPU devices, compiled as the tests compile."""
  return f"--xla_force_host_platform_device_count={devices}{FAST_COMPILE}"
