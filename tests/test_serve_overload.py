"""The synchronous path under overload and faults, over real HTTP: 200 or 503 + Retry-After, never a client time-out."""

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serving import DEADLINE_S, SEED, kill, ongoing_on, post, replicas, wait_for, wait_for_replacement

CLIENT_TIMEOUT_S = DEADLINE_S + 20  # a client that waits a little longer than the service's deadline
ATTEMPTS = 5


def test_a_burst_beyond_capacity_gets_only_assets_and_503s_with_retry_after(service):
    def one(index: int):
        try:
            return post(service, "/v1/generate", {"prompt": "a small red cone", "seed": SEED}, timeout=CLIENT_TIMEOUT_S)
        except httpx.TimeoutException:
            return None

    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(one, range(48)))
    assert None not in responses, "a client timed out"
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 503)


def test_a_decoder_replica_killed_mid_request_costs_that_request_only(service):
    decoders = replicas("DecoderDeployment")  # with one request in flight, only one of them can be serving it
    with ThreadPoolExecutor(1) as pool:
        # Kill once a replica has accepted the request, not when the Gateway has sent it: before acceptance Serve's
        # router may still place it on the replacement. On a loaded machine a request may also end first (refused by
        # admission, or decoded between two looks): then send another, a bounded number of times.
        for _ in range(ATTEMPTS):
            in_flight = pool.submit(
                post, service, "/v1/generate", {"prompt": "a blue cube", "seed": SEED}, timeout=CLIENT_TIMEOUT_S
            )
            wait_for(
                lambda request=in_flight: request.done() or ongoing_on(decoders) >= 1,
                timeout_s=CLIENT_TIMEOUT_S,
                interval_s=0.01,
                what="the request accepted by a Decoder replica, or ended",
            )
            if not in_flight.done():
                break
        else:
            raise AssertionError(f"each of {ATTEMPTS} requests ended before a Decoder replica was seen running it")
        kill(decoders)
        lost = in_flight.result()
    assert lost.status_code == 503 and lost.headers["retry-after"], lost.text
    wait_for_replacement(service, "DecoderDeployment", decoders, timeout_s=120)
    after = post(service, "/v1/generate", {"prompt": "a blue cube", "seed": SEED}, timeout=CLIENT_TIMEOUT_S)
    assert after.status_code == 200, after.text
