"""pixelllm-jax: a JAX/Flax reimplementation of PixelLLM (Xu et al., CVPR 2024).

Version ranges are open so TPU users on newer Pythons get newer releases; the
exact versions CI and the README commands use are pinned in
requirements/constraints.txt.
"""
import setuptools

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "gin-config>=0.5.0",
    "sentencepiece>=0.2.3",
    "numpy>=2.0",
    "pillow>=10.0",
    "absl-py>=2.0",
    "tensorboardX>=2.6",
    # RefCOCO masks (polygons / RLE): the refer builder needs it to prepare referring data.
    "pycocotools>=2.0",
]

EXTRAS = {
    # Metrics that need the COCO caption toolkit (CIDEr, BLEU, ROUGE-L; METEOR needs Java).
    "eval": ["pycocoevalcap>=1.2"],
    # selenium drives Debian's chromium in the demo page's test (scripts/test.sh installs it).
    "test": ["pytest>=8", "pytest-xdist>=3", "portpicker>=1.6", "selenium>=4.20"],
    # Reference implementations for the parity tests and the weight converters' torch
    # inputs. torch==2.13.0 resolves to the machines' local CPU wheel; a bare `torch`
    # would pull a multi-GB CUDA build (docs/DESIGN.md, "Stack").
    "ref": ["torch==2.13.0", "transformers>=5.0", "timm>=1.0", "safetensors>=0.4"],
    # The xmanager executor of launch/ (the local executor and --dry_run need nothing).
    "launch": ["xmanager>=0.8"],
    # The TPU compiler for `python -m pixelllm_jax.scale_check --topology=...` (compiles for
    # TPU pods on a CPU machine): jax's `tpu` extra pins the libtpu that matches jax
    # (jax 0.10.2: libtpu 0.0.42.*, about 680 MB). Not needed to train, test or run on CPU.
    "tpu_aot": ["jax[tpu]>=0.10.2"],
    # XLA's GPU compiler for `python -m pixelllm_jax.scale_check --gpu=h100` (compiles for an
    # NVIDIA GPU on a CPU machine, no GPU or driver needed): jax's CUDA 12 plugin without the
    # CUDA libraries (about 480 MB). Its version must equal jaxlib's.
    "gpu_aot": ["jax-cuda12-plugin>=0.10.2"],
}

setuptools.setup(
    name="pixelllm-jax",
    version="0.1.0",
    description="Pixel Aligned Language Models in JAX/Flax",
    packages=setuptools.find_packages(include=["pixelllm_jax", "pixelllm_jax.*"]),
    package_data={"pixelllm_jax": ["../gin_configs/**/*.gin", "static/*"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "pixelllm-train=pixelllm_jax.train.main:cli_main",
            "pixelllm-eval=pixelllm_jax.eval.__main__:run",
            "pixelllm-convert=pixelllm_jax.convert.__main__:cli",
            "pixelllm-infer=pixelllm_jax.infer.__main__:run",
            "pixelllm-serve=pixelllm_jax.serve:run",
        ]
    },
)
