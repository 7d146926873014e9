"""Installs bscan: batch-size scans, gradient noise scale and critical batch size fits."""

import setuptools

JAX = "jax{}>=0.10.2,<0.11"  # the base runs on CPU; the extras add an accelerator's plugin

INSTALL_REQUIRES = [
    JAX.format(""),
    "flax>=0.12,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-datasets==4.9.10",
    "array_record>=0.8",
    "grain==0.2.18",
    "ml_collections>=1.1",
    "etils[epath]>=1.15",
    "absl-py>=2.1",
    "numpy>=2.0",
    "pandas>=2.2",
    "scipy>=1.13",
    "matplotlib>=3.9",
    "tensorboardX>=2.6",
    "sentencepiece>=0.2",
    "tiktoken>=0.8",
    "tqdm>=4.66",
    "packaging>=23",  # launch.tpu checks --package requirements locally
]

EXTRAS_REQUIRE = {
    # Accelerators, named as JAX names them: pip install 'bscan[cuda12]' (or [cuda13], [tpu]).
    "cpu": [JAX.format("[cpu]")],
    "cuda12": [JAX.format("[cuda12]")],
    "cuda13": [JAX.format("[cuda13]")],
    "tpu": [JAX.format("[tpu]"), "gcsfs"],
    "test": ["pytest>=8", "pytest-xdist>=3.6", "nbclient>=0.10", "nbformat>=5.10",
             "nbmake>=1.5", "ipykernel>=6.29", "submitit>=1.5", "psutil>=5.9"],
    "tf": ["tensorflow-cpu"],
    "gcs": ["gcsfs"],
    "slurm": ["submitit>=1.5"],
    "notebook": ["ipykernel>=6.29", "nbclient>=0.10", "nbformat>=5.10"],
}

setuptools.setup(
    name="bscan",
    version="0.1.0",
    description="Batch-size scans for transformer LMs: gradient noise scale and critical batch size.",
    packages=setuptools.find_packages(include=["bscan", "bscan.*", "experiments", "experiments.*",
                                               "launch", "launch.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
