"""Command line: pretrained T5 / SAM / EVA02 weights -> a PixelLLM init checkpoint.

  python -m pixelllm_jax.convert --model_gin=models/pixelllm_t5_xl.gin \\
      --t5=/ckpt/flan-t5-xl [--t5_format=hf|t5x] \\
      --sam=/ckpt/sam_vit_h_4b8939.pth [--sam_format=auto|original|hf] \\
      --eva02=/ckpt/eva02_large_patch14_224.safetensors \\
      --out=/ckpt/pixelllm_t5_xl_init [--gin.NAME=VALUE ...]

then train from it with `--gin.INIT_CHECKPOINT="'/ckpt/pixelllm_t5_xl_init'"`
(runs/refcoco_t5_xl.gin binds `train.init_checkpoint` to that macro).

Flags:
  --model_gin         (repeatable) the model's gin file(s), searched in --gin_search_paths and the
                      repository's gin_configs/; only `PixelLLMModel.config` is used.
  --gin.NAME=VALUE    a gin binding (as in `python -m pixelllm_jax.train`); also --gin_bindings.
  --t5, --t5_format   a Hugging Face T5 directory (or weight file with config.json beside it),
                      or a classic T5X `checkpoint_<step>` directory with --t5_format=t5x.
  --sam, --sam_format an original segment-anything `.pth`, or a Hugging Face SamModel directory
                      (auto: directory -> hf, file -> original). Fills 'sam' and 'prompt_encoder'.
  --eva02             a timm EVA02 state dict (.safetensors / .pth / .bin, or a directory).
  --out               the output directory (must not exist): an Orbax params checkpoint
                      (`train.checkpoint.save_params`), loadable with `train(init_checkpoint=...)`.
  --seed              the seed of the fresh LoRA adapters (lora_b is zero either way).

Every source is optional; towers without one keep their fresh init when training starts. Errors
(missing keys, shape mismatches, unused source keys, config disagreements) are listed all at
once, naming the keys. See `assemble.py` for what is checked.
"""
import argparse
import os
import sys
import time
from typing import Sequence

import gin

from pixelllm_jax import cli as gin_cli
from pixelllm_jax.convert import assemble as assemble_lib


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m pixelllm_jax.convert",
                              description=__doc__.split("\n", 1)[0])
  p.add_argument("--model_gin", action="append", required=True)
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--gin_search_paths", action="append", default=[])
  p.add_argument("--t5")
  p.add_argument("--t5_format", default="hf", choices=assemble_lib.T5_FORMATS)
  p.add_argument("--sam")
  p.add_argument("--sam_format", default="auto", choices=assemble_lib.SAM_FORMATS)
  p.add_argument("--eva02")
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  return p


def build_model(model_gins: Sequence[str], bindings: Sequence[str] = (),
                search_paths: Sequence[str] = ()):
  """Parses the model gin files (fresh gin state) and returns the gin-built `PixelLLMModel()`."""
  from pixelllm_jax import configurables  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin_cli.parse_gin(model_gins, bindings, search_paths)
  return configurables.REGISTERED["PixelLLMModel"][1]()


def main(argv: Sequence[str] | None = None) -> assemble_lib.Assembled:
  """Runs the conversion; `argv` without the program name (default: sys.argv[1:])."""
  args = _parser().parse_args(gin_cli.rewrite_gin_args(sys.argv[1:] if argv is None else argv))
  from pixelllm_jax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    raise SystemExit(f"--out {out} already exists; give a new directory")
  from pixelllm_jax.convert import common  # pylint: disable=import-outside-toplevel
  for flag in ("t5", "sam", "eva02"):  # before any work: every source must exist
    if getattr(args, flag):
      common.require_path(getattr(args, flag), f"--{flag}")
  start = time.perf_counter()
  model = build_model(args.model_gin, args.gin_bindings, args.gin_search_paths)
  sources = assemble_lib.Sources(t5=args.t5, t5_format=args.t5_format, sam=args.sam,
                                 sam_format=args.sam_format, eva02=args.eva02)
  assembled = assemble_lib.assemble(model, sources, seed=args.seed)
  ckpt.save_params(out, assembled.params)
  print(assemble_lib.format_summary(assembled), flush=True)
  print(f"Wrote {out} in {time.perf_counter() - start:.1f} s; train with "
        f"--gin.INIT_CHECKPOINT=\"'{out}'\" (train.init_checkpoint)", flush=True)
  return assembled


def cli() -> None:
  """Console-script entry (`pixelllm-convert`): conversion errors exit 1 with their message."""
  from pixelllm_jax.convert import common  # pylint: disable=import-outside-toplevel
  try:
    main()
  except (assemble_lib.AssemblyError, common.ConversionError, common.SourceError) as e:
    raise SystemExit(f"pixelllm-convert: {e}") from None


if __name__ == "__main__":
  cli()
