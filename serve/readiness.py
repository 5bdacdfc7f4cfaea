"""What the Gateway knows of its application's deployments, from Serve's own view (replica states, health checks).

A background loop asks the Serve controller every few seconds, so that /readyz and admission read a snapshot
and no probe ever waits on a model replica.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ray import serve

logger = logging.getLogger(__name__)


@dataclass
class DeploymentView:
    running: int  # replicas in state RUNNING (constructed, models loaded, health checks passing)
    status: str  # Serve's deployment status: HEALTHY, UPSCALING, UNHEALTHY, ...


@dataclass
class AppView:
    """The newest snapshot of this application's deployments."""

    app_name: str
    refresh_s: float = 2.0
    deployments: dict[str, DeploymentView] = field(default_factory=dict)
    updated_at: float | None = None

    def running(self, deployment: str) -> int:
        view = self.deployments.get(deployment)
        return 0 if view is None else view.running

    def ready(self, names: list[str]) -> bool:
        """Whether each of `names` has a running replica in the newest snapshot."""
        return self.updated_at is not None and all(self.running(name) > 0 for name in names)

    def describe(self) -> dict:
        return {
            name: {"running_replicas": view.running, "status": view.status}
            for name, view in sorted(self.deployments.items())
        }

    def refresh(self) -> None:
        """One synchronous read of serve.status() (blocking: call it from a thread)."""
        application = serve.status().applications.get(self.app_name)
        if application is None:
            return
        self.deployments = {
            name: DeploymentView(running=status.replica_states.get("RUNNING", 0), status=str(status.status.value))
            for name, status in application.deployments.items()
        }
        self.updated_at = time.time()

    async def refresh_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:  # the controller restarting: keep the last snapshot, try again
                logger.warning("could not read Serve's status: %r", error)
            await asyncio.sleep(self.refresh_s)
