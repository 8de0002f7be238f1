"""The source of a migration: pre-copy rounds, the switch-over, the report.

A page's path on this side, one module a stage: ``attach`` (the guest, its tracker, its
throttle) -> ``rounds`` (pre-copy, decided by ``policy`` with the ``estimator``'s expected
downtime, slowed by ``throttle``) -> ``pages`` (read, digest, cut into Pages events) -> ``sink``
(a live peer or an image file) -> ``switchover`` (freeze, final copy, commit) -> ``report``.
``migration`` composes them into ``SourceMigration``.
"""
