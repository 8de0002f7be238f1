"""migrator: live migration and checkpoints of Linux processes.

Data flows one way::

    tracker -> source -> protocol -> transport -> destination

``tracker`` finds the pages a guest wrote (userfaultfd WP_ASYNC + PAGEMAP_SCAN), ``source`` runs
the pre-copy rounds, ``protocol`` turns events into framed bytes (sans-IO), ``transport`` moves the
bytes over trio streams or files, ``destination`` applies pages, verifies and resumes the guest.

The public API (``Migration``, ``receive``, ``take_checkpoint``, ``restore_chain``, the settings
and reports) is ``migrator.api``, re-exported here on first use: ``import migrator`` alone stays
cheap and loads neither trio nor the engines.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name.startswith("_") or name == "api":
        raise AttributeError(f"module 'migrator' has no attribute {name!r}")
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"migrator.{name}") is not None:
        # a subpackage not imported yet (``from .. import protocol``): the import system imports
        # it when this fails; loading the API here instead could be a circular import
        raise AttributeError(f"module 'migrator' has no attribute {name!r}")
    api = importlib.import_module("migrator.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'migrator' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    api = importlib.import_module("migrator.api")
    return sorted([*globals(), *api.__all__])
