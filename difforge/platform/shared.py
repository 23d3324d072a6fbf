"""Storage every node sees: checked before a run on a cluster of several nodes.

Every step writes its shards from the nodes that did the work and commits a manifest from the
driver. On a cluster, storage that some node cannot see (a path on one host's local disk) would
commit a manifest listing files that only other hosts hold. An object store (s3://, gs://, ...)
is seen by every node by construction; a local path must prove it: the driver writes a marker
file with a random token, and a task pinned to every alive node reads it back.
"""

from __future__ import annotations

import logging
import os
import secrets

from difforge.platform.errors import DifforgeError

log = logging.getLogger("difforge")
LOCAL_PROTOCOLS = ("", "file", "local")


def _reads(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def check_shared(storage: str, timeout: float = 120) -> None:
    """Refuse a local storage path that some alive node of the connected Ray cluster cannot
    see, naming those nodes. Nothing to check for object stores or a single node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    protocol = storage.split("://", 1)[0] if "://" in storage else ""
    if protocol not in LOCAL_PROTOCOLS:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    folder = os.path.join(storage.split("://", 1)[-1], "_difforge")
    os.makedirs(folder, exist_ok=True)
    token = secrets.token_hex(16)
    marker = os.path.join(folder, f"shared-{token[:12]}")
    with open(marker, "w") as f:
        f.write(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_reads)
        pending = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(marker, token)
            for n in nodes
        }
        seen = dict(zip(pending, ray.get(list(pending.values()), timeout=timeout), strict=True))
    finally:
        os.remove(marker)
    blind = sorted(node for node, ok in seen.items() if not ok)
    if blind:
        raise DifforgeError(
            f"storage {storage} is not shared by every node of the cluster: node(s) "
            f"{', '.join(blind)} cannot see what this driver writes there (a path on one "
            "host's own disk). Use s3://... or a file system every node mounts at the same path"
        )
    log.debug("storage %s: seen by all %d nodes", storage, len(nodes))
