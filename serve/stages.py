"""The model deployments: PromptEncoderDeployment (VLM + soft tokens), AlignerDeployment (batched DiT sampler),
DecoderDeployment (TRELLIS).

Each takes the request's deadline (absolute time.time()) and refuses work already past it; the Decoder, whose
work takes seconds, also stops between sampler steps when the deadline passes or the caller cancels.
"""

import asyncio
import time

import numpy as np
import torch
from ray import serve

from gap3d.cancellation import Cancelled, CancelToken, cancellable
from gap3d.export import load_export
from gap3d.generation import align, check_decoder_matches, decoder_seed, load_prompt_encoder
from gap3d.trellis import Decoder as TrellisDecoder
from gap3d.trellis import export_mesh
from serve.stage_calls import AlignRequest


def replica_device() -> torch.device:
    """The GPU Serve gave this replica (its ray_actor_options' num_gpus), else the CPU, as the Decoder chooses."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_deadline(deadline: float | None) -> None:
    """Raise Cancelled("deadline") for work whose requester has already given up on it."""
    CancelToken(deadline).check()


@serve.deployment
class PromptEncoderDeployment:
    """Frozen VLM + trained soft tokens: prompt (+ image) -> (s, d_vlm) latents."""

    def __init__(self, export_uri: str, vlm_path: str | None = None):
        export = load_export(export_uri, with_aligner=False)
        self.encoder = load_prompt_encoder(export, vlm_path, replica_device())
        self.info = {
            "vlm": self.encoder.config.path,
            "soft_tokens": list(self.encoder.soft_tokens.shape),
            "trained_soft_tokens": export.soft_tokens is not None,
        }

    def ready(self) -> dict:
        return self.info

    def count_tokens(self, prompt: str, image_size: tuple[int, int] | None = None) -> int:
        """Tokens the VLM would see for `prompt` with an image of `image_size` (the Gateway's check before
        admission)."""
        return self.encoder.count_tokens(prompt, image_size)

    def encode(self, prompt: str, image=None, deadline: float | None = None) -> np.ndarray:
        check_deadline(deadline)
        with torch.no_grad():
            latents = self.encoder([prompt], None if image is None else [image])[0]
            return latents.float().cpu().numpy()  # (s, d_vlm)


@serve.deployment
class AlignerDeployment:
    """AlignerDiT sampler; concurrent requests are batched, each keeping its own seed's noise."""

    def __init__(self, export_uri: str, max_batch_size: int, batch_wait_timeout_s: float):
        self.export = load_export(export_uri, replica_device())
        self.align_batch.set_max_batch_size(max_batch_size)
        self.align_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        flow = self.export.config.flow
        self.info = {
            "export": export_uri,
            "step": self.export.step,
            "default_steps": flow.sample_steps,
            "default_cfg_scale": flow.cfg_scale,
        }

    def ready(self) -> dict:
        return self.info

    def _align_group(self, requests: list[AlignRequest]) -> np.ndarray:
        cond = torch.from_numpy(np.stack([r.cond for r in requests]))
        first = requests[0]
        return align(self.export, cond, [r.seed for r in requests], first.steps, first.cfg_scale).cpu().numpy()

    @serve.batch  # size and wait are set per replica from serve/config.yaml (`aligner_batch:`)
    async def align_batch(self, requests: list[AlignRequest]) -> list[tuple[np.ndarray, int] | Cancelled]:
        now = time.time()
        results: list = [Cancelled("deadline")] * len(requests)  # requests past their deadline are not computed
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            if request.deadline is None or request.deadline > now:
                groups.setdefault((request.steps, request.cfg_scale), []).append(index)
        for indices in groups.values():
            # A worker thread keeps the replica's event loop free to gather the next batch meanwhile.
            tokens = await asyncio.to_thread(self._align_group, [requests[i] for i in indices])
            for row, index in enumerate(indices):
                results[index] = (tokens[row], len(requests))
        return results

    async def __call__(self, request: AlignRequest) -> tuple[np.ndarray, int]:
        result = await self.align_batch(request)
        if isinstance(result, Cancelled):
            raise result
        return result


@serve.deployment
class DecoderDeployment:
    """TRELLIS: (N, D) tokens -> asset bytes, cancelled between sampler steps when its caller gives up."""

    def __init__(self, trellis_uri: str, export_uri: str, stages: str):
        self.decoder = TrellisDecoder.from_pretrained(trellis_uri, stages=stages)
        check_decoder_matches(load_export(export_uri, with_aligner=False), self.decoder)
        self.info = {"trellis": trellis_uri, "cond_dim": self.decoder.cond_dim, "stage": self.decoder.default_stage}

    def ready(self) -> dict:
        return self.info

    def _decode(
        self, token: CancelToken, tokens: np.ndarray, seed: int, file_format: str, target_faces: int
    ) -> tuple[bytes, float]:
        start = time.perf_counter()
        with cancellable(token):
            mesh = self.decoder.generate(torch.from_numpy(tokens)[None], seed=decoder_seed(seed))[0]
        return export_mesh(mesh, file_format, target_faces), time.perf_counter() - start

    async def decode(
        self, tokens: np.ndarray, seed: int, file_format: str, target_faces: int, deadline: float | None = None
    ) -> tuple[bytes, float]:
        """(N, D) tokens -> (asset bytes, seconds of compute)."""
        token = CancelToken(deadline)
        try:
            return await asyncio.to_thread(self._decode, token, tokens, seed, file_format, target_faces)
        except asyncio.CancelledError:
            token.cancel()  # Serve cancelled the request: the worker thread stops at its next sampler step
            raise
