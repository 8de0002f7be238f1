"""migrator's C: the two cffi API-mode modules compiled at install time from the files here.

``pages``     per-page hashes, zero-page find/gather/scatter and run-list unions, without the GIL
``workload``  the guest's region layout (its control block) and hot loop

Each is ``NAME.c`` with ``NAME.h``, the header that cffi's cdef reads as well, so C and Python
share one definition of every struct and constant; ``build.py`` makes both. Importing this
package loads neither.
"""
