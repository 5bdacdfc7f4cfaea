"""The Decoder deployment's own method, in-process: overlapping decodes agree with serial ones; a cancelled decode
stops."""

import asyncio
import time

import numpy as np
import pytest
import torch

from gap3d.cancellation import Cancelled
from gap3d.trellis.config import SPARSE_STRUCTURE_FLOW
from serve.stages import DecoderDeployment


@pytest.fixture(scope="module")
def decoder(serve_artifacts):
    return DecoderDeployment.func_or_class(serve_artifacts["trellis"], serve_artifacts["export"], "coarse")


@pytest.fixture(scope="module")
def tokens(tiny_config) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tiny_config.aligner.num_tokens, tiny_config.aligner.token_dim, generator=generator).numpy()


def test_overlapping_decodes_give_the_serial_results(decoder, tokens):
    seeds = [3, 5, 3, 5]
    serial = [asyncio.run(decoder.decode(tokens, seed, "glb", 2000))[0] for seed in seeds[:2]]

    async def overlapping():
        return await asyncio.gather(*(decoder.decode(tokens, seed, "glb", 2000) for seed in seeds))

    assert [asset for asset, _ in asyncio.run(overlapping())] == serial + serial


def test_a_decode_past_its_deadline_does_no_work(decoder, tokens):
    calls = []
    handle = decoder.decoder.models[SPARSE_STRUCTURE_FLOW].register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(Cancelled):
            asyncio.run(decoder.decode(tokens, 3, "glb", 2000, deadline=time.time() - 1))
    finally:
        handle.remove()
    assert calls == []


def test_a_cancelled_decode_stops_at_the_next_sampler_step(decoder, tokens):
    calls, steps = [], decoder.decoder.pipeline.sparse_structure_sampler.steps

    async def cancel_during_the_third_model_call():
        loop, task = asyncio.get_running_loop(), None

        def hook(*_):
            calls.append(1)
            if len(calls) == 3:
                loop.call_soon_threadsafe(task.cancel)
                time.sleep(0.2)  # let the cancellation reach the decode before the next step's check

        handle = decoder.decoder.models[SPARSE_STRUCTURE_FLOW].register_forward_hook(hook)
        try:
            task = asyncio.ensure_future(decoder.decode(tokens, 3, "glb", 2000))
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)  # the worker thread, had it gone on, would call the model again meanwhile
        finally:
            handle.remove()

    asyncio.run(cancel_during_the_third_model_call())
    assert 3 <= len(calls) < 2 * steps and len(calls) <= 4  # a step is one call, or two with guidance
