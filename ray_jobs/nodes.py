"""What a job checks or does on every alive node of the Ray cluster it runs on."""

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gap3d import storage


def alive_nodes() -> list[str]:
    """IDs of the cluster's alive nodes (connecting to the cluster first, as Ray Data and Ray Train would)."""
    if not ray.is_initialized():
        ray.init()
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]


def remove_stale_staging_everywhere() -> int:
    """Run gap3d.storage.remove_stale_staging on every alive node (where killed writers left staged files)."""
    clean = ray.remote(num_cpus=0)(storage.remove_stale_staging)
    return sum(
        ray.get(
            [
                clean.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                for node in alive_nodes()
            ]
        )
    )


def check_storage_is_shared(storage_uri: str, what: str) -> None:
    """Fail when `storage_uri` is a local path and the cluster has more than one node: each node's writers would
    write to their own disk, and no process would see all the files."""
    nodes = alive_nodes()
    if len(nodes) > 1 and not storage.is_remote(storage_uri):
        raise ValueError(
            f"{what} {storage_uri} is a local path, but the Ray cluster has {len(nodes)} nodes: each would write its "
            "files to "
            "its own disk. Give object storage every node reaches (s3://bucket/prefix), or run on one node"
        )
