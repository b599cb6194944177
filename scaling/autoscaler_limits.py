"""What an autoscaling Ray cluster can grow to, from what its autoscaler publishes: a study on such a cluster is
checked and packed against the nodes the autoscaler may add, not only those up when it launches.

Ray has no public call for this; its own libraries read the same places (Ray Train checks a worker group against the
cluster config's maximum, Ray Data asks the same config whether the cluster autoscales):
- a cluster config in the GCS: each node type's resources and its most nodes, where an autoscaler reports one
  (its GCS client's `report_cluster_config`; Ray 2.60's own autoscalers do not yet);
- autoscaler v2 (its head started with `RAY_enable_autoscaler_v2=1`) sets a flag in the GCS, also where it runs
  read-only (nothing to scale); the nodes it launches carry their node type's name (`ray_node_type_name`), a
  read-only one's none;
- autoscaler v1 (the cluster launcher's default) writes its status under DEBUG_AUTOSCALING_STATUS each
  update. Every head node runs that monitor, also with nothing to scale (a local Ray, `ray start` without an
  autoscaling config): its "readonly" provider then names each node's type after the node
  (`format_readonly_node_type`), where an autoscaler names them after its config's node types.
The last two say that an autoscaler runs, not what it may add.
"""
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional

UNLIMITED = sys.maxsize  # Ray's figure for a resource of a node type with no limit on its count
STALE_STATUS_S = 120  # a v1 status older than this was left by an autoscaler that no longer runs (it updates every 5 s)


@dataclass(frozen=True)
class AutoscalerLimits:
    """node_types: the resources of each node type it may add; node_counts: the most nodes of each (UNLIMITED where
    it has no limit); max_resources: the most of each resource the cluster may hold (UNLIMITED where a node type
    has no limit). All None where the autoscaler does not publish them."""
    node_types: Optional[list] = None
    max_resources: Optional[dict] = None
    node_counts: Optional[list] = None

    @property
    def known(self):
        return self.max_resources is not None


def limits_of_config(config):
    """The AutoscalerLimits of a cluster config (autoscaler_pb2.ClusterConfig), None where it may add no node."""
    if config is None:
        return None
    groups = [g for g in config.node_group_configs if g.resources and g.max_count != 0]
    if not any(g.max_count == -1 or g.max_count > g.min_count for g in groups):  # as Ray Data decides it
        return None
    max_resources = {}
    for key in {key for g in groups for key in g.resources}:
        counts = [(g.max_count, g.resources[key]) for g in groups if key in g.resources]
        total = UNLIMITED if any(n == -1 for n, _ in counts) else sum(n * r for n, r in counts)
        # The cluster's own cap, also over node types without a limit (Ray's GlobalState sum returns before it then).
        max_resources[key] = min(total, config.max_resources.get(key, UNLIMITED))
    return AutoscalerLimits([{k: float(v) for k, v in g.resources.items()} for g in groups], max_resources,
                            [UNLIMITED if g.max_count == -1 else g.max_count for g in groups])


def autoscaler_limits():
    """The limits of the connected cluster's autoscaler; None where none runs (a fixed cluster, a local Ray)."""
    import ray._private.state
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    config = ray._private.state.state.get_cluster_config()
    if config is not None:  # published: it says whether any node can be added
        return limits_of_config(config)
    if is_autoscaler_v2(fetch_from_server=True):
        return AutoscalerLimits() if v2_autoscales() else None
    return AutoscalerLimits() if v1_autoscales(_internal_kv_get(DEBUG_AUTOSCALING_STATUS)) else None


def v2_autoscales():
    """Whether autoscaler v2 scales the connected cluster: a node of it carries a node type's name."""
    import ray
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(GcsClient(address=ray.get_runtime_context().gcs_address))
    return any(node.ray_node_type_name for node in state.node_states)


def v1_autoscales(status, now=None):
    """Whether autoscaler v1's status (JSON bytes, or None) is a running autoscaler's, not a readonly monitor's."""
    from ray.autoscaler._private.util import format_readonly_node_type

    if not status:
        return False
    status = json.loads(status)
    if (now or time.time()) - status.get("time", 0) > STALE_STATUS_S:
        return False
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != format_readonly_node_type(node) for node, node_type in types.items())


def grown(resources, limits):
    """resources (ray.cluster_resources()) as they may grow under limits: the larger of now and the limit, each (a
    config that leaves out the head node's type undercounts by its resources: the check errs towards refusing)."""
    if limits is None or not limits.known:
        return dict(resources)
    keys = set(resources) | set(limits.max_resources)
    return {k: max(float(resources.get(k, 0.0)), float(limits.max_resources.get(k, 0.0))) for k in keys}
