"""Checkpoint images (issue 6): a live migration whose destination is a file, incremental images
on the guest's armed tracker, chains restored through the destination engine, and inspection.

Public API::

    take_checkpoint(guest_control, image_dir, settings, *, parent=None) -> report   (async)
    run_continuous(guest_control, root, settings, *, every, keep, count=None)        (async)
    restore_chain(image_dir, RestoreSettings(...)) -> report                         (async)
    describe_chain(image_dir) -> dict;  verify_chain(image_dir, *, token) -> dict    (async)
    load_chain(image_dir) -> [ImageInfo, ...] base first;  prune(root, keep)         (async)
"""

from .chain import merge_into_child, prune, run_continuous
from .engine import CheckpointMigration, CheckpointSettings, image_tag, take_checkpoint
from .image import ImageInfo, load_chain, read_image
from .inspect import describe_chain, format_chain, verify_chain
from .restore import RestoreSettings, restore_chain

__all__ = [
    "CheckpointMigration", "CheckpointSettings", "ImageInfo", "RestoreSettings", "describe_chain",
    "format_chain", "image_tag", "load_chain", "merge_into_child", "prune", "read_image", "restore_chain",
    "run_continuous", "take_checkpoint", "verify_chain",
]
