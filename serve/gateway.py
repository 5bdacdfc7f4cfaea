"""GatewayDeployment: GAP3D's one HTTP endpoint, the Serve ingress in front of the stage deployments.

Its work is serve/service.py's Gateway and its HTTP API serve/routes.py's app, built per replica
(`__serve_build_asgi_app__`) around that replica's Gateway, limits and keys.
"""

import asyncio
import logging

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.task_consumer import instantiate_adapter_from_config

from serve.api import ServeLimits
from serve.auth import load_api_keys
from serve.job_runner import task_processor_config
from serve.jobs import JobsConfig
from serve.readiness import AppView
from serve.routes import build_api
from serve.service import Gateway
from serve.stage_calls import StageHandles

logger = logging.getLogger(__name__)


@serve.deployment
@serve.ingress()
class GatewayDeployment(Gateway):
    def __init__(
        self,
        prompt_encoder: DeploymentHandle,
        aligner: DeploymentHandle,
        decoder: DeploymentHandle,
        job_runner: DeploymentHandle | None,
        limits: dict,
        config: dict,
        jobs: dict | None,
        auth: dict,
    ):
        context = serve.get_replica_context()
        jobs_config = None if jobs is None else JobsConfig(**jobs)
        super().__init__(
            StageHandles(prompt_encoder, aligner, decoder),
            ServeLimits(**limits),
            config,
            jobs_config,
            AppView(context.app_name),
            job_queue=None if jobs is None else instantiate_adapter_from_config(task_processor_config(jobs_config)),
            name=context.deployment,
        )
        self.job_runner = job_runner  # bound so that Serve deploys it; jobs reach it through the broker
        self.api_keys = load_api_keys(auth.get("api_keys_file"), auth.get("api_keys_env"))
        source = auth.get("api_keys_file") or f"${auth.get('api_keys_env')}"
        logger.info(
            "auth is %s",
            f"on: {len(self.api_keys)} key(s) from {source}" if self.api_keys else "OFF: every route is open",
        )
        loop = asyncio.get_running_loop()
        self.background = [loop.create_task(self.app_view.refresh_forever())]
        if self.jobs is not None:
            self.background.append(loop.create_task(self.sweep_forever()))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.api_keys)

    def __del__(self):
        """Stop the background loops as Serve stops the replica: it calls this, then shuts the executor they read
        Serve's and Ray's state in (a loop still running would log a failed read until the process ended)."""
        for task in getattr(self, "background", ()):
            task.cancel()
