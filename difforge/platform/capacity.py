"""What a step can have: the cluster's resources now and what its autoscaler can add.

A fixed cluster is what its live nodes hold. An autoscaling cluster (the cluster launcher's
worker types with `min_workers: 0`, KubeRay groups scaled to zero between nightly runs) may
hold nothing yet: a step is fitted against what it can grow to, its demand goes to the
autoscaler (`ray.autoscaler.sdk.request_resources`, cleared when the step ends) and the console
says it waits, for at most `DIFFORGE_SCALE_TIMEOUT_S` seconds (600). The node groups' maxima
are read where the autoscaler reports them to Ray (its cluster config, the record Ray Train
reads); where it does not, nothing is refused up front and the time-out bounds the wait.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

from difforge.platform.devices import device_class
from difforge.platform.errors import ResourceError

log = logging.getLogger(__name__)

POLL_S = 2.0


def scale_timeout_s() -> float:
    raw = os.environ.get("DIFFORGE_SCALE_TIMEOUT_S", "600")
    try:
        return float(raw)
    except ValueError:
        raise ResourceError(f"DIFFORGE_SCALE_TIMEOUT_S={raw!r}: a number of seconds") from None


@dataclass(frozen=True)
class NodeGroup:
    """A kind of node the autoscaler can add: what one holds, and at most how many (inf:
    unbounded)."""

    resources: dict[str, float]
    max_count: float


@dataclass(frozen=True)
class Capacity:
    cpus: float = 0.0  # held by the live nodes now
    gpus: float = 0.0
    node_cpus: float = 0.0  # the largest live node's
    autoscaler: bool = False  # nodes can be added
    groups: tuple[NodeGroup, ...] = field(default=())  # where the autoscaler reports them

    def most(self, key: str) -> float:
        """The most of a resource the cluster can hold: now, or once grown (inf: unknown)."""
        now = self.cpus if key == "CPU" else self.gpus
        if not self.autoscaler:
            return now
        if not self.groups:
            return math.inf
        grown = sum(g.max_count * g.resources.get(key, 0.0) for g in self.groups)
        return max(now, grown)

    def largest_node_cpus(self) -> float:
        return max([self.node_cpus, *(g.resources.get("CPU", 0.0) for g in self.groups)])

    def can_have_gpus(self) -> bool:
        """`num_gpus: auto` means GPUs: the cluster has them, a node group has them, or (an
        autoscaler that does not report its groups) the head says its steps run on GPUs
        (`DIFFORGE_DEVICE_CLASS=cuda`, which the GPU clusters' manifests set)."""
        if self.gpus > 0 or any(g.resources.get("GPU", 0) > 0 for g in self.groups):
            return True
        return self.autoscaler and not self.groups and device_class() == "cuda"

    def describe(self, key: str) -> str:
        name = "CPUs" if key == "CPU" else "GPUs"
        now = self.cpus if key == "CPU" else self.gpus
        most = self.most(key)
        if most > now:
            return f"{now:g} {name} now and can grow to {most:g}"
        return f"{now:g} {name}"


# -- what Ray knows ----------------------------------------------------------------------------
def of_cluster() -> Capacity:
    import ray

    now = ray.cluster_resources()
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return Capacity(
        cpus=float(now.get("CPU", 0.0)),
        gpus=float(now.get("GPU", 0.0)),
        node_cpus=max(nodes, default=float(now.get("CPU", 0.0))),
        autoscaler=autoscaler_present(),
        groups=node_groups(),
    )


def autoscaler_present() -> bool:
    """An autoscaler can add nodes to this cluster: Ray's autoscaler v2 is on (KubeRay's), or
    the monitor's status record (in the GCS, rewritten every few seconds) names node types.
    Every `ray start --head` runs a monitor, but without a cluster config it only reports the
    nodes there are, each its own type `node_<id>`: a fixed cluster."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        flag = _internal_kv_get(b"__autoscaler_v2_enabled", namespace=b"__autoscaler")
        if flag == b"1":
            return True
        status = _internal_kv_get(b"__autoscaling_status")
        if not status:
            return False
        types = json.loads(status)["autoscaler_report"].get("node_type_mapping") or {}
        return any(not str(t).startswith("node_") for t in types.values())
    except Exception:  # noqa: BLE001 - Ray's private record; no autoscaler known
        return False


def node_groups() -> tuple[NodeGroup, ...]:
    """The node groups and their maxima, from the cluster config the autoscaler reports to
    Ray's GCS (a private call, here only; Ray Train reads the same record)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - not reported, or an older Ray
        return ()
    if config is None:
        return ()
    groups = []
    for g in config.node_group_configs:
        most = getattr(g, "max_count", -1)
        groups.append(
            NodeGroup(
                resources={k: float(v) for k, v in g.resources.items()},
                max_count=math.inf if most < 0 else float(most),
            )
        )
    return tuple(groups)


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


# -- placing a step's demand -------------------------------------------------------------------
def fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Could the nodes hold these bundles (each on one node), largest first."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        for node in free:
            if all(node.get(k, 0.0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def show(bundles: list[dict[str, float]]) -> str:
    kinds: dict[str, int] = {}
    for b in bundles:
        text = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
        kinds[text] = kinds.get(text, 0) + 1
    return ", ".join(f"{n} x {text}" for text, n in kinds.items())


def wait_for_nodes(step: str, bundles: list[dict[str, float]], timeout_s: float) -> bool:
    """Ask the autoscaler for a step's bundles and wait until the live nodes hold them.
    Returns whether a request was made (the caller clears it when the step ends)."""
    if fits(bundles, live_nodes()):
        return False
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    log.info(
        "step %s: waiting for the autoscaler to add nodes for %s (at most %.0f s; "
        "DIFFORGE_SCALE_TIMEOUT_S)",
        step,
        show(bundles),
        timeout_s,
    )
    t0 = time.monotonic()
    while not fits(bundles, live_nodes()):
        if time.monotonic() - t0 > timeout_s:
            release()
            now = of_cluster()
            raise ResourceError(
                f"step '{step}' waited {timeout_s:.0f} s for nodes to hold {show(bundles)}; "
                f"the cluster has {now.describe('CPU')} and {now.describe('GPU')}. Its "
                "autoscaler added none that fit: check its node types and their maxima "
                "(`ray status` on the head), or raise DIFFORGE_SCALE_TIMEOUT_S"
            )
        time.sleep(POLL_S)
    log.info("step %s: nodes ready after %.0f s", step, time.monotonic() - t0)
    return True


def release() -> None:
    """Clear this driver's standing request, so the autoscaler may scale the nodes down."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception as exc:  # noqa: BLE001 - the step's outcome stands; idle nodes time out
        log.warning("could not clear the autoscaler request: %s", exc)
