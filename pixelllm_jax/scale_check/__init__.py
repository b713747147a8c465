"""A compile-time pod check: will a configuration fit a TPU slice or a GPU, and what does a step
cost?

  python -m pixelllm_jax.scale_check --topology=v5e:4x4 --rules=fsdp --mesh=1,-1,1 \\
      --remat=block --compute_dtype=bfloat16            # the paper T5-XL config, 64 images
  python -m pixelllm_jax.scale_check --gpu=h100:8 --rules=fsdp --mesh=1,8,1 \\
      --remat=block --compute_dtype=bfloat16 --scan     # the same, on an 8 x H100 host
  python -m pixelllm_jax.scale_check --cpu_devices=8 --gin_file=models/tiny.gin --batch=8

It lowers and compiles the training step (`trainer.make_train_step`: forward, backward and the
optimizer update, the state donated) and one cached decoding step (one token for every caption
slot against the KV cache, the cache donated) from abstract inputs only: `jax.ShapeDtypeStruct`s
carrying their shardings, so no array is allocated and no accelerator is needed. For a TPU
topology the compiler is the TPU compiler of the `libtpu` wheel (the optional extra `tpu_aot`:
`pip install -e .[tpu_aot]`) running on this CPU machine, as MaxText's `train_compile` and
axlearn's AOT compilation check a pod before renting it. `--gpu=h100[:N]` compiles with XLA's
GPU compiler for N H100s of one host, deviceless (`gpu_targets.py`; the optional extra
`gpu_aot`). `--cpu_devices=N` compiles for N fake CPU devices instead (any mesh; `--hbm_gib`
gives a memory to compare with).

- `aot.py`: compiling from abstract inputs and reading XLA's report (library; the test uses it).
- `model_choice.py`: the gin config's model with the flags' changes (T5 size, scan, remat, dtype).
- `gpu_targets.py`: the GPUs to compile for (public figures) and the share of memory jax uses.
- `__main__.py`: the command line; one table line and one JSON line per compiled step.

Memory is XLA's per chip (`compiled.memory_analysis()`): arguments, outputs, temporaries, and
the aliased bytes that donated arguments share with outputs; peak = arguments + outputs -
aliases + temporaries (the buffers live at once), compared with the chip's HBM. FLOPs are XLA's
per chip (`compiled.cost_analysis()`); a step's total is that times the chips.
"""
