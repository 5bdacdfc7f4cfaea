"""The Gateway's work behind its routes: every request checked once up front, admission, the stages, async jobs,
readiness.

serve/routes.py maps HTTP onto these methods; serve/gateway.py makes this class the Serve deployment.
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from gap3d.cancellation import CancelToken
from serve.admission import Admission
from serve.api import ApiError, GenerateRequest, GenerationInputs, ServeLimits, bad_input, generation_inputs
from serve.auth import Caller
from serve.job_quota import JobQuota
from serve.job_runner import GENERATE_TASK
from serve.jobs import JobConflict, JobRecord, JobsConfig, JobStore
from serve.metrics import ServiceMetrics
from serve.readiness import AppView, replica_alive
from serve.stage_calls import GenerationResult, StageCaller, StageHandles, run_generation

logger = logging.getLogger(__name__)

TOKEN_CHECK_S = 10.0  # the PromptEncoder counts a prompt's tokens in milliseconds; past this it is unavailable


class Gateway:
    """One Gateway replica's state: limits, metrics, admission, the job store and its view of the application."""

    def __init__(
        self,
        handles: StageHandles,
        limits: ServeLimits,
        config: dict,
        jobs: JobsConfig | None,
        app_view: AppView,
        job_queue=None,
        name: str = "GatewayDeployment",
    ):
        self.handles, self.limits, self.app_view, self.job_queue, self.name = handles, limits, app_view, job_queue, name
        self.config, self.flow = config, config["flow"]
        self.max_prompt_tokens = config["vlm"]["max_prompt_tokens"]
        self.metrics = ServiceMetrics()
        self.admission = Admission(limits.deadline_s, limits.expected_decode_s)
        self.jobs = None if jobs is None else JobStore(jobs)
        self.quota = None if jobs is None else JobQuota(jobs)
        # Decoding a large image takes a CPU-second: never on the event loop, which also answers the probes.
        self.image_decoder = ThreadPoolExecutor(limits.image_decode_threads, thread_name_prefix="image-decode")

    # Checks every route makes before it takes any work on.

    async def checked(self, body: GenerateRequest) -> GenerationInputs:
        """The request checked against the limits, its image decoded and its tokens counted."""
        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(self.image_decoder, generation_inputs, body, self.limits, self.flow)
        size = None if inputs.image is None else inputs.image.size
        count = StageCaller(CancelToken(time.time() + TOKEN_CHECK_S), None, {}, TOKEN_CHECK_S)
        tokens = await count("prompt_encoder", self.handles.prompt_encoder.count_tokens.remote(inputs.prompt, size))
        if tokens > self.max_prompt_tokens:
            raise bad_input(
                f"prompt is {tokens} tokens{' with its image' if size else ''}, more than the VLM's limit of "
                f"{self.max_prompt_tokens} (vlm.max_prompt_tokens)",
                "prompt",
            )
        return inputs

    # Synchronous generation.

    def _decode_slots(self) -> float:
        """Decodes this Gateway replica may count on at once: its share of the running Decoder replicas."""
        decoders = max(self.app_view.running(self.handles.decoder.deployment_name), 1)
        gateways = max(self.app_view.running(self.name), 1)
        return decoders * self.limits.decoder_slots_per_replica / gateways

    def _token(self) -> CancelToken:
        return CancelToken(time.time() + self.limits.deadline_s)

    async def generate(self, inputs: GenerationInputs) -> GenerationResult:
        """Admission, then the three stages within the deadline."""
        retry_after = self.admission.try_admit(self._decode_slots())
        if retry_after is not None:
            raise ApiError(
                503,
                "the service is at capacity; retry later",
                headers={"Retry-After": str(retry_after)},
                kind="overloaded",
            )
        self.metrics.admitted.inc()
        try:
            result = await run_generation(
                self.handles, inputs, self._token(), self.metrics, deadline_s=self.limits.deadline_s
            )
        finally:
            self.admission.release()
            self.metrics.admitted.dec()
        self.admission.observe(
            result.decode_seconds, sum(seconds for stage, seconds in result.timings.items() if stage != "decoder")
        )
        return result

    async def embed(self, inputs: GenerationInputs) -> GenerationResult:
        return await run_generation(
            self.handles, inputs, self._token(), self.metrics, decode=False, deadline_s=self.limits.deadline_s
        )

    # Async jobs: state and results in the JobStore, work through the broker to the JobRunner.

    def _store(self) -> JobStore:
        if self.jobs is None:
            raise ApiError(
                503, "async jobs are not configured on this service (the `jobs:` builder arg)", kind="unavailable"
            )
        return self.jobs

    async def _enqueue(self, job_id: str) -> None:
        try:
            await asyncio.to_thread(self.job_queue.enqueue_task_sync, GENERATE_TASK, args=[job_id])
        except Exception as error:
            logger.error("could not queue job %s: %r", job_id, error)
            raise ApiError(
                503,
                "the job queue is unavailable; the job stays queued and is retried by the sweep",
                headers={"Retry-After": "5"},
                kind="unavailable",
            ) from None

    async def submit(self, body: GenerateRequest, caller: Caller, idempotency_key: str | None) -> tuple[str, bool]:
        """Check, store and queue a job; returns (id, created). A replayed Idempotency-Key returns its job."""
        store = self._store()
        await self.checked(body)  # a bad request is refused now, not failed later
        replay = idempotency_key is not None and await asyncio.to_thread(
            store.get, store.new_id(idempotency_key, caller.owner)
        )
        if not replay:
            self.quota.check(caller.owner)
        request = body.model_copy(update={"image": None}).model_dump_json().encode()
        image = None if body.image is None else body.image.encode()
        try:
            record, created = await asyncio.to_thread(
                store.create, request, body.format, idempotency_key, caller.owner, image
            )
        except JobConflict as error:
            raise ApiError(409, str(error), field="Idempotency-Key", kind="bad_input") from None
        if created:
            self.quota.submitted(caller.owner)
            await self._enqueue(record.id)
        return record.id, created

    async def job(self, job_id: str) -> JobRecord | None:
        """A job's record (None: unknown or expired); a running job whose runner died is recovered at once."""
        store = self._store()
        try:
            record = await asyncio.to_thread(store.get, job_id)
        except KeyError:  # not a job id at all
            return None
        if record is not None and record.status == "running":
            lost = await asyncio.to_thread(store.lost_runner, record, time.time(), replica_alive)
            if lost and await asyncio.to_thread(store.recover, record, lost):
                await self._enqueue(record.id)
        return record

    async def known_job(self, job_id: str) -> JobRecord:
        record = await self.job(job_id)
        if record is None:
            raise ApiError(404, "no such job (unknown, or its result has expired)", kind="bad_input")
        return record

    async def result(self, record: JobRecord) -> bytes | None:
        """A succeeded job's asset (None for any other job)."""
        if record.status != "succeeded":
            return None
        return await asyncio.to_thread(self._store().result, record.id, record.file_format)

    async def cancel(self, job_id: str) -> JobRecord:
        await self.known_job(job_id)
        return await asyncio.to_thread(self._store().cancel, job_id)

    async def sweep_forever(self) -> None:
        while True:
            began = time.time()
            try:
                sweep = await asyncio.to_thread(self.jobs.sweep, began, replica_alive)
                self.quota.swept(sweep.usage, began)
                for state, count in sweep.counts.items():
                    self.metrics.jobs.labels(state).set(count)
                for job_id in sweep.requeue:
                    await self._enqueue(job_id)
            except Exception as error:  # storage or broker down: keep sweeping
                logger.warning("job sweep failed: %r", error)
            await asyncio.sleep(self.jobs.config.sweep_every_s)

    # Readiness and models.

    def readiness(self) -> tuple[bool, dict]:
        """Whether the synchronous path can serve (each stage has a running replica), and the snapshot behind it.
        The JobRunner is not needed for that: a job queued while it restarts waits in the broker."""
        needed = [handle.deployment_name for handle in (self.handles.prompt_encoder, self.handles.aligner)]
        needed.append(self.handles.decoder.deployment_name)
        ready = self.app_view.ready(needed)
        return ready, {
            "status": "ready" if ready else "unavailable",
            "needs": needed,
            "deployments": self.app_view.describe(),
            "checked_at": self.app_view.updated_at,
        }

    async def models(self) -> dict:
        """What each stage has loaded, from where, and the trained run's config."""
        names = ("prompt_encoder", "aligner", "decoder")
        calls = [getattr(self.handles, name).ready.remote() for name in names]
        infos = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
        return {"stages": dict(zip(names, infos)), "config": self.config}
