"""Build hook for the guest's compiled hot loop; all other metadata is in pyproject.toml.

cffi API mode: ``migrator/guest/_build_workload.py`` describes ``migrator.guest._workload``, and
setuptools compiles it during ``pip install`` (needs a C compiler and the Python headers;
``scripts/bootstrap`` installs them on Debian/Ubuntu).
"""

from setuptools import setup

setup(cffi_modules=["migrator/guest/_build_workload.py:ffibuilder"])
