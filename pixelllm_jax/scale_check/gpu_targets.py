"""NVIDIA GPUs to compile for without one: XLA's GPU compiler, deviceless.

jax's CUDA plugin (`jax-cuda12-plugin` + `jax-cuda12-pjrt`, the optional extra `gpu_aot`) can
build a compile-only client from a *target config*: a text `GpuTargetConfigProto` describing the
device (SM count, shared memory, memory size, compute capability, CUDA and cuDNN versions). The
process stays on CPU; `compiled.memory_analysis()` is the GPU compiler's buffer assignment, as it
would be on the device. Autotuning needs a device and is skipped, so kernels are the compiler's
defaults: the memory figures hold, run times are not measured here.

The figures below are NVIDIA's public specifications of each part.
"""
import dataclasses
import os

GIB = 1024 ** 3

# Of a GPU's memory, a jax process gives XLA this fraction by default (its allocator reserves
# it at start-up); XLA_PYTHON_CLIENT_MEM_FRACTION changes it. The pod check compares a step's
# peak with this share: the deviceless compiler, asked to fit the paper step into 80 GiB,
# rematerialized towards a limit of 61.65 GiB, about this share too.
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  description: str          # the device_kind CUDA reports
  memory_gib: float         # nominal HBM
  sm_count: int
  clock_ghz: float          # boost clock
  memory_bandwidth: float   # bytes/s
  l2_bytes: int
  compute_capability: tuple[int, int]
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int


GPUS = {
    # H100 SXM5 80 GB (AWS P5, the DGX H100): 132 SMs, 228 KiB of shared memory per SM (227
    # KiB per block when opted in), 50 MiB L2, 3.35 TB/s.
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 80.0, 132, 1.98, 3.35e12, 50 * 1024 ** 2, (9, 0),
                    228 * 1024, 227 * 1024),
}

# The CUDA and cuDNN versions jax 0.10's CUDA 12 wheels are built against (what a GPU host with
# those wheels reports); they choose which fused kernels the compiler may emit.
CUDA_VERSION = (12, 8)
CUDNN_VERSION = (9, 8)

# Deviceless there is no autotuner, and XLA's Triton GEMM emitter, left without one, refused a
# small matmul of the tiny model ("Couldn't find output tile sizes"): matmuls go to cuBLAS.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def target_config(spec: GpuSpec) -> str:
  """The `GpuTargetConfigProto` text jax's CUDA plugin compiles against."""
  fields = {
      "threads_per_block_limit": 1024,
      "threads_per_warp": 32,
      "shared_memory_per_block": 48 * 1024,
      "shared_memory_per_core": spec.shared_memory_per_sm,
      "threads_per_core_limit": 2048,
      "core_count": spec.sm_count,
      "fpus_per_core": 128,
      "block_dim_limit_x": 2 ** 31 - 1,
      "block_dim_limit_y": 65535,
      "block_dim_limit_z": 65535,
      "memory_bandwidth": int(spec.memory_bandwidth),
      "l2_cache_size": spec.l2_bytes,
      "clock_rate_ghz": spec.clock_ghz,
      "device_memory_size": int(spec.memory_gib * GIB),
      "shared_memory_per_block_optin": spec.shared_memory_per_block_optin,
      "registers_per_core_limit": 65536,
      "registers_per_block_limit": 65536,
  }
  major, minor = spec.compute_capability
  info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
  return (f"gpu_device_info {{\n{info}\n"
          f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }}\n"
          f"runtime_version {{ major: {CUDA_VERSION[0]} minor: {CUDA_VERSION[1]} }}\n"
          f'device_description_str: "{spec.description}"\n')


def usable_gib(spec: GpuSpec) -> float:
  """The memory a jax process lets XLA use on `spec` (XLA_PYTHON_CLIENT_MEM_FRACTION, default
  75% of it)."""
  return spec.memory_gib * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                DEFAULT_MEM_FRACTION))


def by_kind(device_kind: str) -> GpuSpec | None:
  return next((s for s in GPUS.values() if s.description == device_kind), None)


def parse(name: str) -> tuple[GpuSpec, int]:
  """'h100' or 'h100:8' (one host with 8 of them) -> (spec, count)."""
  kind, _, count = name.partition(":")
  if kind not in GPUS:
    raise ValueError(f"--gpu={name!r}: known GPUs are {sorted(GPUS)} (optionally ':COUNT')")
  if count and not (count.isdigit() and int(count) >= 1):
    raise ValueError(f"--gpu={name!r}: COUNT must be a positive integer")
  return GPUS[kind], int(count or 1)


def devices(name: str) -> list:
  """Compile-only devices of `name` ('h100', 'h100:8'), one host; needs jax's CUDA plugin."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  spec, count = parse(name)
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=target_config(spec),
                                        topology=f"1x1x{count}")
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"GPU target {name!r} did not resolve: {e}\n(XLA's GPU compiler comes with jax's CUDA "
        "plugin: pip install -e .[gpu_aot]; no GPU or driver is needed)") from e
  return list(desc.devices)
