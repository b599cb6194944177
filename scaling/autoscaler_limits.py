"""What an autoscaling Ray cluster can grow to, from what its autoscaler publishes: a study on such a cluster is
checked and packed against the nodes the autoscaler may add, not only those up when it launches.

Ray has no public call for this. Its own libraries read the same two places (Ray Train checks a worker group against
`GlobalState.get_max_resources_from_cluster_config`, Ray Data asks the same config whether the cluster autoscales):
- autoscaler v2 (KubeRay's, or `RAY_enable_autoscaler_v2=1`) publishes its node types in the GCS: each type's
  resources and its most nodes;
- autoscaler v1 (the cluster launcher's default) publishes only its status, under DEBUG_AUTOSCALING_STATUS, each
  update: that it runs, not what it may add. Every head node runs that monitor, also with nothing to scale (a local
  Ray, `ray start` without an autoscaling config): its "readonly" provider then names each node's type after the node
  (`format_readonly_node_type`), where an autoscaler names them after its config's node types.
"""
import json
import sys
from dataclasses import dataclass
from typing import Optional

UNLIMITED = sys.maxsize  # Ray's figure for a resource of a node type with no limit on its count


@dataclass(frozen=True)
class AutoscalerLimits:
    """node_types: the resources of each node type it may add; max_resources: the most of each resource the cluster
    may hold (UNLIMITED where a node type has no limit). Both None where the autoscaler does not publish them (v1)."""
    node_types: Optional[list] = None
    max_resources: Optional[dict] = None

    @property
    def known(self):
        return self.max_resources is not None


def limits_of_config(config):
    """The AutoscalerLimits of an autoscaler v2 ClusterConfig (autoscaler_pb2), None where it may add no node."""
    from ray._private.state import GlobalState

    if config is None:
        return None
    groups = [g for g in config.node_group_configs if g.resources and g.max_count != 0]
    if not any(g.max_count == -1 or g.max_count > g.min_count for g in groups):  # as Ray Data decides it
        return None
    keys = {key for g in groups for key in g.resources}
    # Ray's own sum of each resource over the node types, each at its most nodes, capped by the cluster's maximum.
    max_resources = {key: GlobalState._calculate_max_resource_from_cluster_config(config, key) or 0 for key in keys}
    return AutoscalerLimits([{k: float(v) for k, v in g.resources.items()} for g in groups], max_resources)


def autoscaler_limits():
    """The limits of the connected cluster's autoscaler; None where none runs (a fixed cluster, a local Ray)."""
    import ray._private.state
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    limits = limits_of_config(ray._private.state.state.get_cluster_config())
    if limits is not None:
        return limits
    if v1_autoscales(_internal_kv_get(DEBUG_AUTOSCALING_STATUS)):
        return AutoscalerLimits()
    return None


def v1_autoscales(status):
    """Whether autoscaler v1's status (JSON bytes, or None) comes from an autoscaler, not a readonly monitor."""
    from ray.autoscaler._private.util import format_readonly_node_type

    if not status:
        return False
    types = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != format_readonly_node_type(node) for node, node_type in types.items())


def grown(resources, limits):
    """resources (ray.cluster_resources()) as they may grow under limits: the larger of now and the limit, each."""
    if limits is None or not limits.known:
        return dict(resources)
    keys = set(resources) | set(limits.max_resources)
    return {k: max(float(resources.get(k, 0.0)), float(limits.max_resources.get(k, 0.0))) for k in keys}
