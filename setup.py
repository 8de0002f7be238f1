"""Build hook for migrator's two small C modules; all other metadata is in pyproject.toml.

cffi API mode: ``migrator/native/build.py`` makes ``migrator.native.pages`` (per-page digests,
zero pages) and ``migrator.native.workload`` (the guest's hot loop) from the ``.c``/``.h`` files
beside it; setuptools compiles them during ``pip install`` (needs a C compiler and the Python
headers; ``scripts/bootstrap`` installs them on Debian/Ubuntu).
"""

from setuptools import setup

setup(cffi_modules=["migrator/native/build.py:pages", "migrator/native/build.py:workload"])
