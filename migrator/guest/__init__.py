"""The guest: a guest-like process whose whole state lives in the memory region it writes.

Library side (no compiled code needed): ``GuestClient`` talks to a guest's control socket,
``spawn_guest`` starts one as a child, ``region_digest`` is the digest everyone compares. The
process itself (``migrator guest``) is ``server`` + ``runner`` + ``workload`` over the compiled
hot loop ``migrator.native.workload``. Protocol: docs/guest-protocol.md.
"""

from .client import Attachment, GuestClient
from .layout import region_digest
from .spawn import GuestProcess, spawn_guest

__all__ = ["Attachment", "GuestClient", "GuestProcess", "region_digest", "spawn_guest"]
