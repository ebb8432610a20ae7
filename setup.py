"""Installs the AligNet data pipeline (`alignet` CLI, library, pipelines, trainer).

Exact versions that resolve together live in `constraints.txt`; `setup.sh` installs with them.
"""
import setuptools

setuptools.setup(
    name="alignet-data",
    version="0.1.0",
    description="Staged, offline data pipeline and JAX trainer for AligNet (Muttenthaler et al., Nature 2025).",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["alignet_data*", "pipelines*", "trainer*", "schemas*"]),
    package_data={
        "schemas": ["*.json"],
        "trainer": ["configs/*.json"],
        "alignet_data": ["checkpoints/*.npz", "checkpoints/*.json"],
    },
    install_requires=[
        "apache-beam>=2.77,<2.78",
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources",  # tfds imports it but does not declare it.
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "numpy>=2.4,<2.5",
        "pyarrow>=25,<26",
        "faiss-cpu>=1.15,<1.16",
        "fsspec>=2026.9",
        "gcsfs>=2026.9",
        "grain>=0.2.18",
        "protobuf>=6.33,<7",
        "google-crc32c",
        "numba>=0.68,<0.69",  # compiled hot loops (labelling, TFRecord encoding) in alignet_data/dataset/kernels.py
        "scipy",
        "threadpoolctl",  # one-thread BLAS calls in clustering.transform_rows: the same bits on every worker
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        # gcp-storage-emulator: gs:// tests. opencv-python-headless: the released trainer's resize, which the
        # student preprocessing is checked against (tests/models/test_resize_parity.py).
        "test": ["pytest", "pytest-timeout", "ruff", "gcp-storage-emulator", "opencv-python-headless"],
        # The SigLIP parity test compares our Flax model with transformers' PyTorch one. torch itself is installed
        # by pip from its CPU wheel (see .ci/run): resolving it here would pull a multi-GB CUDA build.
        "parity": ["transformers==5.24.0", "safetensors==0.8.0", "sympy", "networkx", "jinja2", "filelock"],
        # Beam's DaskRunner (`--runner=dask --dask_client_address=tcp://HOST:8786`) on a dask.distributed cluster.
        "dask": ["dask[distributed]>=2024.4.2", "distributed>=2024.4.2"],
    },
    entry_points={"console_scripts": ["alignet=pipelines.cli:main"]},
)
