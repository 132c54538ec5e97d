"""Package list for setuptools; all other metadata is in pyproject.toml.

The top-level ``gin/`` folder (its place is fixed by the product card) ships inside the wheel
as the package data ``craftfn/configs/``, so an installed craftfn finds its configs by bare
name (``craftfn train --gin_file char_gpt.gin``) from any directory. Packages are found, not
listed by hand, so a new subpackage ships without editing this file.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["craftfn", "craftfn.*"]), "craftfn.configs"],
    package_dir={"craftfn.configs": "gin"},
    package_data={"craftfn.configs": ["*.gin", "**/*.gin"]},
)
