"""Referring localization at paper scale (runs/refcoco_t5_xl.gin): a learning-rate sweep.

  python launch/refcoco_t5_xl_lr.py --executor=xm --dry_run \\
      --data_dir=/gcs/BUCKET/data --ckpt_dir=/gcs/BUCKET/ckpt --root=/gcs/BUCKET/sweeps/lr
  python launch/refcoco_t5_xl_lr.py --executor=xm \\
      --data_dir=/gcs/BUCKET/data --ckpt_dir=/gcs/BUCKET/ckpt --root=/gcs/BUCKET/sweeps/lr

Three work units (the official 5e-5 and a factor 2 either side), each one xmanager job on one
host with 8 H100s, parameters sharded over the `fsdp` mesh axis; each unit evaluates after
training. Paths are the bucket's Cloud Storage FUSE mount (/gcs/...) that Vertex AI jobs have. `--ckpt_dir` holds the converted init checkpoint
(`python -m pixelllm_jax.convert ... --out=CKPT_DIR/pixelllm_t5_xl_init`) and T5's
spiece.model under flan-t5-xl/; `--data_dir` is the tfds manual dir of RefCOCO
(docs/DATA_FORMATS.md). Memory per chip for these choices: see the README's paper-scale
section.
"""
from absl import flags

from pixelllm_jax.launch import launcher, sweep

_DATA_DIR = flags.DEFINE_string("data_dir", "/gcs/BUCKET/data", "RefCOCO's tfds manual dir.")
_CKPT_DIR = flags.DEFINE_string("ckpt_dir", "/gcs/BUCKET/ckpt", "Converted weights, spiece.")


def make_sweep() -> sweep.Sweep:
  return sweep.Sweep(
      name="refcoco_t5_xl_lr",
      gin_files=("runs/refcoco_t5_xl.gin",),
      bindings={"DATA_DIR": _DATA_DIR.value,
                "INIT_CHECKPOINT": f"{_CKPT_DIR.value}/pixelllm_t5_xl_init",
                "SPM_PATH": f"{_CKPT_DIR.value}/flan-t5-xl/spiece.model",
                "Partitioner.mesh_shape": (1, -1, 1), "Partitioner.rules": "fsdp"},
      units=sweep.product(sweep.axis("lr", "make_optimizer.learning_rate",
                                     [2.5e-5, 5e-5, 1e-4])),
      evaluate=True,
      resources=sweep.Resources(accelerator="H100", topology="8"))


if __name__ == "__main__":
  launcher.run(make_sweep)
