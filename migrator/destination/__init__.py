"""The destination of a migration: restore guests, applying pages, verification, resume.

``guests`` starts (or keeps prepared) the restore-mode guests the pages go into; ``engine``
receives one migration: applies pages, compares digests, runs the guest's self-check and resumes
it after the source's Commit.
"""
