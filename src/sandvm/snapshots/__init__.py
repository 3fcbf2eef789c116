"""Snapshots: the on-disk format and store (save/restore live in the sandbox layer)."""

from sandvm.snapshots.store import FORMAT, FORMAT_VERSION, Snapshot, SnapshotStore

__all__ = ["FORMAT", "FORMAT_VERSION", "Snapshot", "SnapshotStore"]
