"""Packaging details pyproject.toml cannot express: the repository's recipes/ folder ships inside
the wheel as the private package ``supra._recipes`` (torchtune already installs a top-level
package named ``recipes``), so ``supra run`` finds recipes and configs after a plain install; the
files under ``supra/assets/`` (the tiny teacher checkpoint and its tokenizer) ship as package data,
named ``supra:assets/...`` in configs (``supra.config.resolve_path``)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["supra", "supra.*"]) + ["supra._recipes"],
    package_dir={"supra._recipes": "recipes"},
    package_data={"supra._recipes": ["*.py", "configs/*/*.yaml"], "supra": ["assets/*/*"]},
)
