from setuptools import setup

# Metadata lives in pyproject.toml; this shim keeps `pip install -e .` working on old pips.
setup()
