"""The demo's learning rate x seed: a 2 x 2 sweep of the tiny model on the generated world.

  python launch/world_lr_seed.py                          # 4 units, one at a time, evaluated
  python launch/world_lr_seed.py --report                 # the table, also while it runs
  python launch/world_lr_seed.py --executor=xm --dry_run  # the same units as xmanager jobs

Needs the world (`python -m pixelllm_jax.data.world.generate --out_dir=data/world`; the
demo script makes it). Each unit trains 1,500 steps of runs/demo.gin (about 3 minutes on a
2-core CPU) and evaluates on the world's test scenes; everything goes to
runs/sweeps/world_lr_seed/<unit>/ and the report to runs/sweeps/world_lr_seed/report.txt.
Running it again skips finished units and resumes the others from their checkpoints.
"""
from pixelllm_jax.launch import launcher, sweep

SWEEP = sweep.Sweep(
    name="world_lr_seed",
    gin_files=("runs/demo.gin",),
    bindings={"WORLD_DIR": "data/world", "TRAIN_STEPS": 1500,
              "make_optimizer.warmup_steps": 150, "train.checkpoint_every": 500},
    units=sweep.product(sweep.axis("lr", "make_optimizer.learning_rate", [1e-3, 2e-3]),
                        sweep.axis("seed", "train.seed", [0, 1])),
    evaluate=True,
    resources=sweep.Resources(accelerator="A100", topology="1"))

if __name__ == "__main__":
  launcher.run(SWEEP)
