"""Lets timm import on the CPU-only torch 2.13.0 when PyPI's torchvision can't load its ops.

Import this before `timm` (any test that builds a timm reference does `import torchvision_shim`).
Why: timm imports torchvision, and PyPI's torchvision 0.28.0 is CUDA-linked, so its `_C` extension
fails to load against torch 2.13.0+cpu; `torchvision/_meta_registrations.py` then calls
`register_fake("torchvision::nms")` on an op that was never defined and the import dies with
"operator torchvision::nms does not exist". Here, only when `_C` cannot be loaded, the two op schemas
it needs (`nms`, `qnms`) are defined; their C++ kernels stay missing, and nothing we test uses them.
It must stay conditional: defining them next to a working `_C` aborts with "Tried to register an
operator (torchvision::nms) ... multiple times".
"""
import glob
import importlib.util
import os

import torch

_LIBRARY = None  # keeps the definitions registered for the life of the process


def _install() -> None:
  global _LIBRARY
  spec = importlib.util.find_spec("torchvision")
  if spec is None or spec.origin is None or hasattr(torch.ops.torchvision, "nms"):
    return  # no torchvision (nothing to fix) or its ops already exist
  try:
    torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))[0])
    return  # a working torchvision: leave it alone
  except (OSError, ImportError, IndexError, RuntimeError):
    pass
  _LIBRARY = torch.library.Library("torchvision", "DEF")
  _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_install()
