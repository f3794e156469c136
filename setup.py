"""Packaging for kfac_keras."""

import os
import re

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(_HERE, "kfac_keras", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    name="kfac_keras",
    version=_version(),
    description=(
        "K-FAC (Kronecker-factored approximate curvature) as a Keras 3 "
        "optimizer for TensorFlow 2."
    ),
    long_description=open(os.path.join(_HERE, "README.md")).read()
    if os.path.exists(os.path.join(_HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kfac_keras", "kfac_keras.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.0,<3.16",
        "tensorflow-probability[tf]>=0.24,<0.26",
        "absl-py>=1.0",
        "numpy>=1.23",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "nbclient>=0.7",
            "nbformat>=5",
            "ipykernel>=6",
            "matplotlib>=3.5",
            "tensorboard>=2.20",
        ],
        # TensorFlow 2.21 no longer installs TensorBoard.
        "examples": ["matplotlib>=3.5", "scikit-learn>=1.0", "tensorboard>=2.20"],
    },
    license="Apache-2.0",
)
