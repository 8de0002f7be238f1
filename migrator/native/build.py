"""cffi API-mode builds of the two compiled modules, ``migrator.native.pages`` and ``.workload``.

``setup.py`` names the functions ``pages`` and ``workload`` in ``cffi_modules``; ``pip install``
calls each for its builder and compiles the module with the machine's C compiler. A module is
two files beside this one: ``NAME.c``, compiled as its own source, and ``NAME.h``, which both
that source and cffi's generated wrapper include and which cffi's cdef reads unchanged. So
Python sees the very struct layouts and constants C compiles (cffi also checks them when the
module loads), and the header holds only what cdef parses: declarations and integer defines.

cffi runs this file standalone, not as part of the package, so it imports nothing from
migrator; the builders are functions so that importing it reads no files.
"""

import os

from cffi import FFI

HERE = os.path.dirname(__file__)   # relative to setup.py's directory when cffi runs this file
COMPILE_ARGS = ["-O2", "-std=gnu11"]


def _builder(name: str, parts: tuple[str, ...] = ()) -> FFI:
    """Module ``name``: ``name.c`` and each of ``parts``' ``.c``, declared by their ``.h`` files."""
    files = (name, *parts)
    headers = [os.path.join(HERE, f + ".h") for f in files]
    declarations = ""
    for header in headers:
        with open(header) as f:
            declarations += f.read()
    ffi = FFI()
    ffi.cdef(declarations)
    ffi.set_source(
        f"migrator.native.{name}",
        "#include <stdint.h>\n" + "".join(f'#include "{f}.h"\n' for f in files),
        sources=[os.path.join(HERE, f + ".c") for f in files],
        depends=headers,
        include_dirs=[HERE],
        extra_compile_args=COMPILE_ARGS,
    )
    return ffi


def pages() -> FFI:
    """Per-page hashes, zero-page find/gather/scatter and run-list unions (``migrator.core.digest``,
    ``migrator.protocol._payload``, ``migrator.core.runs``), post-copy's page states and its
    fault loops (``migrator.destination.faults``, ``migrator.source.postcopy``)."""
    return _builder("pages", ("postcopy",))


def workload() -> FFI:
    """The guest's control block and hot loop (``migrator.guest.workload``)."""
    return _builder("workload")
