"""Install cl_arch: five source folders under one import root (see docs/design.md, "Layout")."""
import os

from setuptools import setup

# Generic top-level names (kernels, train, eval) would collide with other
# distributions, so every source folder is mapped under the cl_arch root.
ROOTS = {
    "cl_arch": "cl_arch",
    "cl_arch.kernels": "kernels",
    "cl_arch.train": "train",
    "cl_arch.eval": "eval",
    "cl_arch.scripts": "scripts",
}


def _packages():
    """Every folder with an __init__.py under the mapped roots, named under cl_arch."""
    found = []
    for pkg, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, folder)
                found.append(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    return found


setup(
    name="cl_arch",
    version="0.2.0",
    description="Transformers with reward-modulated fast-weight memories that keep learning while used",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir=ROOTS,
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
    extras_require={"dev": ["pytest", "hypothesis", "fla-core==0.6.0"], "hf": ["transformers>=5.24,<6"]},
    entry_points={"console_scripts": ["cl-arch=cl_arch.scripts.cli:main"]},
)
