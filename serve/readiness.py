"""What the Gateway knows of its application's deployments: Serve's own view, checked against Ray's.

A background loop takes a snapshot twice a second, so that /readyz and admission read it and no probe ever waits
on a model replica. Serve's controller counts a replica RUNNING until its next health check fails
(`health_check_period_s` in serve/config.yaml); Ray drops a dead replica's actor name at once. A replica counts
here while both see it, so /readyz follows a lost replica within about one snapshot.
"""

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import ray
from ray import serve

logger = logging.getLogger(__name__)

REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<id>


@dataclass
class DeploymentView:
    running: int  # replicas in state RUNNING (constructed, models loaded, health checks passing)
    status: str  # Serve's deployment status: HEALTHY, UPSCALING, UNHEALTHY, ...


@dataclass
class AppView:
    """The newest snapshot of this application's deployments."""

    app_name: str
    refresh_s: float = 0.5  # how often the snapshot is taken
    stale_after_s: float = 10.0  # a snapshot older than this (the controller unreachable) means "not ready"
    deployments: dict[str, DeploymentView] = field(default_factory=dict)
    updated_at: float | None = None

    def running(self, deployment: str) -> int:
        view = self.deployments.get(deployment)
        return 0 if view is None else view.running

    def ready(self, names: list[str], now: float | None = None) -> bool:
        """Whether each of `names` has a running replica in a snapshot that is not stale."""
        now = time.time() if now is None else now
        fresh = self.updated_at is not None and now - self.updated_at < self.stale_after_s
        return fresh and all(self.running(name) > 0 for name in names)

    def describe(self) -> dict:
        return {
            name: {"running_replicas": view.running, "status": view.status}
            for name, view in sorted(self.deployments.items())
        }

    def refresh(self) -> None:
        """One read of serve.status() and of Ray's named actors (blocking: call it from a thread)."""
        application = serve.status().applications.get(self.app_name)
        if application is None:
            return
        alive = self.live_replicas()
        self.deployments = {
            name: DeploymentView(
                running=min(status.replica_states.get("RUNNING", 0), alive[name]), status=str(status.status.value)
            )
            for name, status in application.deployments.items()
        }
        self.updated_at = time.time()

    def live_replicas(self) -> Counter:
        """Replica actors of this application that Ray knows alive, by deployment."""
        prefix = f"{REPLICA_PREFIX}{self.app_name}#"
        return Counter(
            actor["name"][len(prefix) :].split("#", 1)[0]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)
        )

    async def refresh_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:  # the controller restarting: keep the last snapshot, try again
                logger.warning("could not read Serve's status: %r", error)
            await asyncio.sleep(self.refresh_s)


def replica_alive(actor_name: str) -> bool:
    """Whether the Serve replica actor `actor_name` still exists (blocking: one call to Ray's GCS).

    Ray drops a dead actor's name at once, well before Serve's controller reports the replica gone. Only a name
    Ray does not know is dead; any other failure to look it up counts as alive.
    """
    try:
        ray.get_actor(actor_name, namespace="serve")
    except ValueError:
        return False
    except Exception as error:
        logger.warning("could not look up replica %s: %r", actor_name, error)
    return True
