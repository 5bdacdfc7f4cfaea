"""JobRunnerDeployment: the Ray Serve task consumer that runs queued generation jobs.

Jobs travel through the broker of Ray Serve's asynchronous-inference API (Celery; Redis here) as bare job ids;
their requests, state and results live in the JobStore (serve/jobs.py). The handler claims the job in its
replica's name, runs the same three stage calls as the synchronous route (serve/stage_calls.py) under the job's
deadline, reports its stage and a heartbeat while it runs, and stops when the job is cancelled. A run whose
replica dies is seen by the Gateway as soon as Ray drops the replica's name (or by its stale heartbeat), and is
retried or failed.
"""

import asyncio
import logging
import threading

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_handler

from gap3d.cancellation import CancelToken
from serve.api import ApiError, GenerateRequest, ServeLimits, generation_inputs
from serve.jobs import JobsConfig, JobStore
from serve.stage_calls import StageHandles, run_generation

logger = logging.getLogger(__name__)

GENERATE_TASK = "gap3d.generate"


def task_processor_config(config: JobsConfig) -> TaskProcessorConfig:
    """The broker settings shared by the consumer (JobRunner) and the producer (Gateway)."""
    adapter = CeleryAdapterConfig(
        broker_url=config.broker,
        backend_url=config.broker,
        # A worker reserves only the jobs it runs: jobs prefetched by a replica that dies would wait for the broker's
        # visibility timeout. Results live in the JobStore; the backend keeps Celery's task states only briefly.
        app_custom_config={"worker_prefetch_multiplier": 1, "result_expires": 3600, "worker_hijack_root_logger": False},
        # A message unacknowledged this long is delivered again; the sweep has re-queued a lost job long before.
        broker_transport_options={"visibility_timeout": int(config.deadline_s + 2 * config.lease_s)},
    )
    # Retries of a failed run are the sweep's business (it sees lost workers too); Celery retries none.
    return TaskProcessorConfig(queue_name=config.queue, adapter_config=adapter, max_retries=0)


class JobRunnerDeployment:
    """Runs generation jobs from the broker queue; holds handles to the three stages.

    serve/app.py makes it a deployment with the broker of the Serve config (`task_consumer`), so it carries no
    decorator here.
    """

    def __init__(
        self,
        prompt_encoder: DeploymentHandle,
        aligner: DeploymentHandle,
        decoder: DeploymentHandle,
        jobs: dict,
        limits: dict,
        flow: dict,
    ):
        self.handles = StageHandles(prompt_encoder, aligner, decoder)
        self.config = JobsConfig(**jobs)
        self.store = JobStore(self.config)
        self.limits = ServeLimits(**limits)
        self.flow = flow
        # The replica's actor name, stamped on the jobs it claims: the Gateway looks it up to tell a dead runner.
        self.name = serve.get_replica_context().replica_id.to_full_id_str()

    def ready(self) -> dict:
        return {"store": self.store.root, "queue": self.config.queue}

    def _keep_reporting(self, record, token: CancelToken, stop: threading.Event) -> None:
        while not stop.wait(self.config.lease_s / 3):
            if not self.store.report(record):
                token.cancel()  # cancelled by a DELETE, or the sweep gave the job to another run
                return

    @task_handler(name=GENERATE_TASK)
    def generate(self, job_id: str) -> str:
        """Run job `job_id` once; returns its status (or "skipped" when it was not there to run)."""
        record = self.store.claim(job_id, runner=self.name)
        if record is None:
            logger.info("job %s is not queued; skipped", job_id)
            return "skipped"
        token = CancelToken(record.started_at + self.config.deadline_s)
        stop = threading.Event()
        reporter = threading.Thread(target=self._keep_reporting, args=(record, token, stop), daemon=True)
        reporter.start()
        try:
            body = GenerateRequest.model_validate_json(self.store.request(job_id))
            image = self.store.request_image(job_id)
            body = body if image is None else body.model_copy(update={"image": image.decode()})
            inputs = generation_inputs(body, self.limits, self.flow)

            def on_stage(stage: str, progress: float) -> None:
                if not self.store.report(record, stage, progress):
                    token.cancel()

            # Celery runs this handler in a thread of its own, without an event loop: give the stage calls one.
            result = asyncio.run(
                run_generation(self.handles, inputs, token, deadline_s=self.config.deadline_s, on_stage=on_stage)
            )
            status, error, outcome = "succeeded", None, {"timings": result.timings, "result": result.asset}
        except ApiError as api_error:
            status, error, outcome = ("cancelled" if api_error.kind == "cancelled" else "failed"), api_error.message, {}
        except Exception as unexpected:
            logger.exception("job %s failed", job_id)
            status, error, outcome = "failed", f"{type(unexpected).__name__} in the job runner", {}
        finally:
            stop.set()
            reporter.join()
        if not self.store.finish(record, status, error=error, **outcome):
            status = "superseded"  # cancelled, or handed to another run, while this one worked
        logger.info("job %s: %s (attempt %d)", job_id, status, record.attempts)
        return status
