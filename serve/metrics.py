"""The ingress's Prometheus metrics, in a registry of its own (scraped at /metrics)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("prompt_encoder", "aligner", "decoder")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class ServiceMetrics:
    """Requests (by route and status, in flight, body sizes), stages (latency by outcome, errors by kind, requests
    waiting on each), admission, cancellations and jobs."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gap3d_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.in_flight = Gauge("gap3d_requests_in_flight", "requests being processed", registry=self.registry)
        self.body_bytes = Histogram(
            "gap3d_request_body_bytes",
            "bytes of each request body the Gateway read, refused ones up to where they were refused",
            registry=self.registry,
            buckets=tuple(2.0**power for power in (10, 14, 17, 20, 22, 24, 25, 26)),  # 1 KiB .. 64 MiB
        )
        self.stage_seconds = Histogram(
            "gap3d_stage_seconds",
            "latency of each pipeline stage as seen by the ingress, by outcome (ok or an error kind)",
            ["stage", "outcome"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.stage_errors = Counter(
            "gap3d_stage_errors", "stage calls that failed, by kind", ["stage", "kind"], registry=self.registry
        )
        self.stage_waiting = Gauge(
            "gap3d_stage_requests_waiting",
            "requests this ingress has sent to a stage and not yet got back (queued or running)",
            ["stage"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gap3d_aligner_batch_size",
            "size of the Aligner batch each request was served in",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.admitted = Gauge(
            "gap3d_generations_admitted",
            "synchronous generations admitted and not yet finished",
            registry=self.registry,
        )
        self.cancelled = Counter(
            "gap3d_requests_cancelled",
            "requests abandoned before their result: deadline, client (disconnected) or job (DELETE)",
            ["reason"],
            registry=self.registry,
        )
        self.jobs = Gauge(
            "gap3d_jobs",
            "async jobs in the store by state (refreshed by the sweeper)",
            ["state"],
            registry=self.registry,
        )
        for stage in STAGES:
            self.stage_waiting.labels(stage)
        for state in JOB_STATES:
            self.jobs.labels(state)
