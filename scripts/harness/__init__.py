"""Helpers for tests, benchmarks and experiments (never used by the migration path itself)."""
