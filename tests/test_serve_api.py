"""The generation responses' per-stage timing headers: one format, written by the Gateway, read by clients."""

import httpx
import pytest

from serve.api import stage_timing_headers, stage_timings


def test_stage_timings_read_back_the_seconds_the_headers_were_written_from():
    timings = {"prompt_encoder": 0.0123, "aligner": 0.5, "decoder": 2.25}
    assert stage_timings(stage_timing_headers(timings)) == pytest.approx(timings, abs=1e-4)


def test_stage_timings_ignore_other_headers_and_header_case():
    headers = {"X-Timing-Aligner-ms": "40.0", "X-Aligner-Batch-Size": "3", "content-type": "model/gltf-binary"}
    assert stage_timings(headers) == pytest.approx({"aligner": 0.04})
    assert stage_timings(httpx.Headers(headers)) == pytest.approx({"aligner": 0.04})
