"""GAP3D on Ray Serve: GatewayDeployment (FastAPI ingress) -> PromptEncoderDeployment -> AlignerDeployment
(batched) -> DecoderDeployment, plus the JobRunnerDeployment.

`serve run serve/config.yaml` builds the application with `app(args)`; replica counts, autoscaling,
`max_ongoing_requests` and `ray_actor_options` come from that YAML, not from this file. The deployments live in
serve/stages.py (models), serve/job_runner.py (async jobs) and serve/gateway.py (HTTP).
"""

import logging
import os
from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel
from ray import serve
from ray.serve.task_consumer import task_consumer

from gap3d.config import load_config
from gap3d.export import CONFIG_NAME, find_export_dir
from serve.api import ServeLimits
from serve.gateway import GatewayDeployment
from serve.job_runner import JobRunnerDeployment, task_processor_config
from serve.jobs import JobsConfig
from serve.stages import AlignerDeployment, DecoderDeployment, PromptEncoderDeployment

logger = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """Builder arguments (the `args:` of serve/config.yaml)."""

    export: str  # trained aligner export (or training checkpoint) directory or s3:// URI
    trellis: str  # TRELLIS checkpoint directory or s3:// URI
    vlm: str | None = None  # VLM checkpoint, overriding the one recorded in the export's config
    decoder_stages: str = "auto"  # TRELLIS stages to run: "auto" (all the checkpoint has), "coarse" or "full"
    limits: dict = {}  # serve.api.ServeLimits fields
    aligner_batch: dict = {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}  # the Aligner's @serve.batch settings
    jobs: dict | None = None  # serve.jobs.JobsConfig fields; None turns the async job routes off
    api_keys_file: str | None = None  # file of bearer keys, one per line, on the Gateway's node (a mounted secret)
    api_keys_env: str | None = (
        None  # environment variable of the Gateway holding comma-separated keys (runtime_env or pod env)
    )


def _expand(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser())


def app(args: dict) -> serve.Application:
    """Build the composed application from builder args."""
    parsed = AppArgs(**args)
    export, trellis = _expand(parsed.export), _expand(parsed.trellis)
    vlm = None if parsed.vlm is None else _expand(parsed.vlm)
    config = load_config(yaml_path=find_export_dir(export) / CONFIG_NAME)
    limits = asdict(ServeLimits(**parsed.limits))
    jobs = None if parsed.jobs is None else asdict(JobsConfig(**parsed.jobs))
    if os.environ.get("GAP3D_API_KEYS") and not (parsed.api_keys_file or parsed.api_keys_env):
        logger.warning(
            "GAP3D_API_KEYS is set in this shell, but the Serve config names no key source, so auth is OFF; "
            "set api_keys_env (with the variable in the Gateway's runtime_env) or api_keys_file in the config's args"
        )
    stages = (
        PromptEncoderDeployment.bind(export, vlm),
        AlignerDeployment.bind(export, **parsed.aligner_batch),
        DecoderDeployment.bind(trellis, export, parsed.decoder_stages),
    )
    runner = None
    if jobs is not None:
        # The consumer's broker comes from the config, so its class is decorated here rather than at import.
        consumer = serve.deployment(name="JobRunnerDeployment")(
            task_consumer(task_processor_config=task_processor_config(JobsConfig(**jobs)))(JobRunnerDeployment)
        )
        runner = consumer.bind(*stages, jobs, limits, asdict(config.flow))
    return GatewayDeployment.bind(
        *stages,
        runner,
        limits,
        {**asdict(config), "artifacts": {"export": export, "trellis": trellis, "vlm": vlm or config.vlm.path}},
        jobs,
        {"api_keys_file": parsed.api_keys_file, "api_keys_env": parsed.api_keys_env},
    )
