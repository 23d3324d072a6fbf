"""Garbage collection of a storage root (`difforge gc`): attempt folders no commit uses, work
folders of committed datasets, and, on request, older committed versions of a step. (A commit
itself removes the attempt folders of runs that crashed before it started:
`outputs.remove_unused_attempts`.)"""

from __future__ import annotations

import time
from dataclasses import dataclass

from difforge.platform.datasets import MANIFEST, Manifest, read_manifest, url_to_fs
from difforge.platform.outputs import ATTEMPT_PREFIX, attempt_folders, attempt_started


@dataclass
class GarbageReport:
    """What `collect_garbage` removed (or would remove, in a dry run)."""

    removed: list[str]
    kept: int  # committed datasets left in place


def _older_versions(committed: dict[str, Manifest], keep_last: int) -> list[str]:
    """The committed versions of each step (folders named by fingerprint) but its
    `keep_last` newest."""
    import re

    versions: dict[str, list[str]] = {}
    for folder in committed:
        parent, name = folder.rsplit("/", 1)
        if re.fullmatch(r"[0-9a-f]{16}", name):  # a step's versions, by fingerprint
            versions.setdefault(parent, []).append(folder)
    older = []
    for folders in versions.values():
        folders.sort(key=lambda f: committed[f].created, reverse=True)
        older += folders[keep_last:]
    return older


def collect_garbage(
    storage: str,
    older_than: float = 24 * 3600,
    keep_last: int | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> GarbageReport:
    """Clean a storage root (or any folder under it), as `difforge gc` does:

    - attempt folders that no commit uses (crashed or losing runs, commits replaced by
      `--force`), begun more than `older_than` seconds ago;
    - the work folders (`_work/`: checkpoints, resume markers) of datasets committed more than
      `older_than` seconds ago: a rerun of their step is cached and never reads them;
    - with `keep_last=N`, every committed version of a step but its N newest, whole.

    Uncommitted work folders stay: a rerun resumes from them."""
    now = time.time() if now is None else now
    cutoff = now - older_than
    fs, root = url_to_fs(storage)
    try:
        found = fs.find(root, withdirs=True, detail=True)
    except FileNotFoundError:
        return GarbageReport([], 0)
    datasets: set[str] = set()
    for path, info in found.items():
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name == MANIFEST or (name.startswith(ATTEMPT_PREFIX) and info["type"] == "directory"):
            datasets.add(path.rstrip("/").rsplit("/", 1)[0])
    removed: list[str] = []

    def remove(path: str) -> None:
        removed.append(fs.unstrip_protocol(path))
        if not dry_run:
            fs.rm(path, recursive=True)

    committed: dict[str, Manifest] = {}
    for folder in sorted(datasets):
        if any(folder.startswith(r.split("://", 1)[-1] + "/") for r in removed):
            continue
        manifest = None
        if f"{folder}/{MANIFEST}" in found:
            manifest = read_manifest(fs.unstrip_protocol(folder))
            committed[folder] = manifest
        used = set(manifest.attempts()) if manifest else set()
        for name, path in attempt_folders(fs.unstrip_protocol(folder)).items():
            started = attempt_started(name)
            if name not in used and started is not None and started < cutoff:
                remove(path)
        if manifest is not None and manifest.created < cutoff and f"{folder}/_work" in found:
            remove(f"{folder}/_work")
    if keep_last is not None:
        for folder in _older_versions(committed, keep_last):
            remove(folder)
            committed.pop(folder)
    gone = tuple(r.split("://", 1)[-1] for r in removed)
    kept = sum(1 for f in committed if not f.startswith(gone))
    return GarbageReport(removed, kept)
