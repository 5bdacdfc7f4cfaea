"""The driver of tests/test_two_nodes.py, in a process of its own (a process joins one Ray cluster, and the test
session already has one): a two-node cluster on this machine (ray.cluster_utils.Cluster, each node its own raylet
and CPUs), training with 2 workers, one per node, and the non-head node killed once a checkpoint is registered.

    python -m tests.two_nodes --features s3://... --storage s3://... --local-storage DIR --out result.json

Writes one JSON object: the local-storage error, the node IDs, the run's final metrics and, per kept checkpoint, the
nodes its record names as writers.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.cluster_utils import Cluster

from gap3d import storage
from ray_jobs.run_checkpoints import RECORD_NAME, RunStorage
from ray_jobs.train import run_training
from tests.support import checkpoint_complete, small_job

NODE_CPUS = 3  # with 2 CPUs per worker, each node holds one worker and Ray Data's read tasks
KILL_AFTER = 10
STEPS = 30


def job():
    return small_job(
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=10",
        "scaling.zero_stage=1",
        "scaling.worker_cpus=2",
        "scaling.materialize_features=false",  # read per epoch: materialising first costs more than these short epochs
    )


def writer_nodes(run_uri: str) -> dict[int, list[str]]:
    run = RunStorage.at(run_uri)
    nodes = {}
    for step in run.steps():
        with run.fs.open(storage.join(run.checkpoint_path(step), RECORD_NAME)) as handle:
            nodes[step] = sorted({entry["node"] for entry in json.load(handle)["files"].values()})
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--features", "--storage", "--local-storage", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    cluster = Cluster(
        initialize_head=True, connect=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False}
    )
    second = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    out = {"head": cluster.head_node.node_id, "lost": second.node_id}
    config, sections = job()
    try:
        run_training(config, sections["scaling"], args.local_storage, features=args.features, name="local")
    except ValueError as error:
        out["local_error"] = str(error)

    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(
            run_training,
            config,
            sections["scaling"],
            args.storage,
            features=args.features,
            name="two-nodes",
            max_failures=1,
        )
        registered = checkpoint_complete(storage.join(args.storage, "two-nodes"), KILL_AFTER)
        while not training.done() and not registered():
            time.sleep(0.2)
        if not training.done():
            cluster.remove_node(second, allow_graceful=False)
            out["added"] = cluster.add_node(num_cpus=NODE_CPUS).node_id  # as an autoscaler replaces a lost node
        result = training.result()
    out["metrics"] = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float, str))}
    out["writers"] = writer_nodes(storage.join(args.storage, "two-nodes"))
    with open(args.out, "w") as handle:
        json.dump(out, handle)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
