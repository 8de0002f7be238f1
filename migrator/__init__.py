"""migrator: live migration and checkpoints of Linux processes.

Data flows one way::

    tracker -> source -> protocol -> transport -> destination

``tracker`` finds the pages a guest wrote (userfaultfd WP_ASYNC + PAGEMAP_SCAN), ``source`` runs
the pre-copy rounds, ``protocol`` turns events into framed bytes (sans-IO), ``transport`` moves the
bytes over trio streams or files, ``destination`` applies pages, verifies and resumes the guest.
"""

__version__ = "0.1.0"
