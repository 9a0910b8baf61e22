"""Backups of volumes (chunked, sparse, content-addressed, full and incremental) and
their restore and verification, as engine jobs. Between api and engine: it drives the
engine's jobs, locks and staged creation and reads volumes through the backends; the
API exposes it (docs/backup.md)."""
