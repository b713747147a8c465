"""Inference on a user's own images: `python -m pixelllm_jax.infer` / `pixelllm-infer`.

  requests.py    what a request is (image, task, box / point / expression), reading them
                 from an image, a folder or a JSONL, and their checks
  loading.py     a checkpoint (a run's model dir, or converted weights) + its gin -> Loaded
  inferencer.py  one request -> Answer: the image on the model's canvas as evaluation puts
                 it, the task's slot, `model.predict`, words / boxes / masks in image pixels
  render.py      the PNG: each word written at its point on the image
  __main__.py    the command line (batch mode: progress, bad requests reported, exit code)
The demo page (`pixelllm_jax/serve.py`) answers through the same `Inferencer`.
"""
