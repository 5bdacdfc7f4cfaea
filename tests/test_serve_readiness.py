"""Readiness over real HTTP: /readyz follows the replicas the synchronous path needs, and only those."""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from serve.gateway import GatewayDeployment
from serve.readiness import AppView
from tests.serving import kill, replicas, wait_for, wait_for_replacement


def readyz(base: str) -> int:
    return httpx.get(f"{base}/readyz", timeout=10).status_code


def test_a_lost_replica_makes_readyz_answer_503_within_2_s(service):
    aligners = replicas("AlignerDeployment")
    assert readyz(service) == 200
    kill(aligners)
    killed_at = time.monotonic()
    wait_for(lambda: readyz(service) == 503, timeout_s=10, interval_s=0.05, what="/readyz answering 503")
    assert time.monotonic() - killed_at < 2
    wait_for_replacement(service, "AlignerDeployment", aligners, timeout_s=120)


def test_readyz_stays_200_while_the_job_runner_restarts(service):
    runners = replicas("JobRunnerDeployment")
    kill(runners)
    runner_counts = []
    deadline = time.monotonic() + 5  # several snapshots, and Serve's health check of the dead replica
    while time.monotonic() < deadline:
        response = httpx.get(f"{service}/readyz", timeout=10)
        assert response.status_code == 200, response.json()
        runner_counts.append(response.json()["deployments"]["JobRunnerDeployment"]["running_replicas"])
        time.sleep(0.1)
    assert 0 in runner_counts  # the probes above ran while no JobRunner was running

    def runner_back():
        return httpx.get(f"{service}/readyz", timeout=10).json()["deployments"]["JobRunnerDeployment"][
            "running_replicas"
        ]

    wait_for(runner_back, timeout_s=120, interval_s=0.5, what="a new JobRunner replica running")


def test_a_stopping_gateway_ends_its_state_reads_before_serve_closes_their_executor(caplog):
    async def stop_as_serve_does() -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1)
        loop.set_default_executor(executor)  # as Serve's replica does for user code
        view = AppView("gap3d")
        view.refresh = view.look = lambda: None  # reads that succeed, without a Serve application
        gateway = GatewayDeployment.func_or_class.__new__(GatewayDeployment.func_or_class)
        gateway.background = [loop.create_task(view.refresh_forever())]
        await asyncio.sleep(0.3)
        await gateway.__del__()  # Serve's order on a replica's graceful shutdown: the destructor, then the executor
        executor.shutdown(wait=False)
        await asyncio.sleep(1.0)  # two refresh periods and five looks
        assert all(task.done() for task in gateway.background)

    with caplog.at_level(logging.WARNING, logger="serve.readiness"):
        asyncio.run(stop_as_serve_does())
    assert "could not read the application's state" not in caplog.text
