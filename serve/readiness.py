"""What the Gateway knows of its application's deployments: Serve's own view, checked against Ray's.

Two background loops keep snapshots, so that /readyz and admission read them and no probe ever waits on a model
replica or on the controller. Serve's controller counts a replica RUNNING until its next health check fails
(`health_check_period_s` in serve/config.yaml), and answers slowly while it replaces one; Ray drops a dead
replica's actor name at once. A replica counts here while Serve has it RUNNING and Ray still knows its name, so
/readyz follows a lost replica within about one look at Ray's names (a fifth of a second), whatever the controller
is busy with, and its replacement counts once Serve has it RUNNING.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.serve.context import _get_global_client
from ray.serve.schema import ReplicaState, ServeInstanceDetails

logger = logging.getLogger(__name__)


@dataclass
class DeploymentView:
    running: frozenset[str]  # actor names of the replicas Serve has RUNNING (models loaded, health checks passing)
    status: str  # Serve's deployment status: HEALTHY, UPSCALING, UNHEALTHY, ...


@dataclass
class AppView:
    """The newest snapshots of this application's deployments (Serve's) and of its live replica actors (Ray's)."""

    app_name: str
    refresh_s: float = 0.5  # how often Serve's status is read
    look_s: float = 0.2  # how often Ray's named actors are listed
    stale_after_s: float = 10.0  # snapshots older than this (controller or GCS unreachable) mean "not ready"
    deployments: dict[str, DeploymentView] = field(default_factory=dict)
    alive: frozenset[str] = frozenset()  # names of the actors Ray knows alive
    updated_at: float | None = None  # of Serve's snapshot
    looked_at: float | None = None  # of Ray's

    def running(self, deployment: str) -> int:
        view = self.deployments.get(deployment)
        return 0 if view is None else len(view.running & self.alive)

    def ready(self, names: list[str], now: float | None = None) -> bool:
        """Whether each of `names` has a running replica in snapshots that are not stale."""
        now = time.time() if now is None else now
        fresh = all(at is not None and now - at < self.stale_after_s for at in (self.updated_at, self.looked_at))
        return fresh and all(self.running(name) > 0 for name in names)

    def describe(self) -> dict:
        return {
            name: {"running_replicas": self.running(name), "status": view.status}
            for name, view in sorted(self.deployments.items())
        }

    def refresh(self) -> None:
        """One read of Serve's view of the application (blocking: call it from a thread)."""
        # What serve.status() reads, one step before it drops the replicas' names for their counts per state.
        details = ServeInstanceDetails(**_get_global_client().get_serve_details())
        application = details.applications.get(self.app_name)
        if application is None:
            return
        self.deployments = {
            name: DeploymentView(
                running=frozenset(r.actor_name for r in deployment.replicas if r.state == ReplicaState.RUNNING),
                status=str(deployment.status.value),
            )
            for name, deployment in application.deployments.items()
        }
        self.updated_at = time.time()

    def look(self) -> None:
        """One listing of the actors Ray knows alive by name (blocking: call it from a thread)."""
        self.alive = frozenset(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True))
        self.looked_at = time.time()

    async def refresh_forever(self) -> None:
        await asyncio.gather(self._repeat(self.refresh, self.refresh_s), self._repeat(self.look, self.look_s))

    @staticmethod
    async def _repeat(read: Callable[[], None], every_s: float) -> None:
        while True:
            try:
                await asyncio.to_thread(read)
            except Exception as error:  # the controller or the GCS restarting: keep the last snapshot, try again
                logger.warning("could not read the application's state: %r", error)
            await asyncio.sleep(every_s)


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
