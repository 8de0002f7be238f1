"""The shared ground of every layer: plain values, errors, digests, page runs, units, buffers.

Nothing here knows about migrations' phases or the wire; every other package may import it.
Import the modules themselves (``migrator.core.model``, ``migrator.core.errors`` …): this file
stays empty so that the kernel layer and the codec never load more than they use.
"""
