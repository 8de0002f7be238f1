"""Build hook for migrator's two small C modules; all other metadata is in pyproject.toml.

cffi API mode: ``migrator/guest/_build_workload.py`` describes the guest's hot loop
(``migrator.guest._workload``) and ``migrator/_build_native.py`` the per-page digests
(``migrator._native``); setuptools compiles them during ``pip install`` (needs a C compiler and the Python headers;
``scripts/bootstrap`` installs them on Debian/Ubuntu).
"""

from setuptools import setup

setup(cffi_modules=["migrator/guest/_build_workload.py:ffibuilder", "migrator/_build_native.py:ffibuilder"])
