"""Prompt -> aligned DINOv2 tokens -> 3D asset, as three in-process stages.

The Ray Serve deployments (serve/app.py) each hold one of these stages; calling them here, in one process,
gives the same result for the same seed, which is what the serving tests and benchmark compare against.
Each request's aligner noise comes from its own seed, so batching requests together changes nothing.
"""

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gap3d.export import AlignerExport, apply_soft_tokens, load_export
from gap3d.flow import sample
from gap3d.prompt_encoder import PromptEncoder
from gap3d.trellis import Decoder, export_mesh

logger = logging.getLogger(__name__)

DECODER_STREAM = 1  # the second word of the decoder's SeedSequence; the aligner draws from the request seed directly


def decode_prompt_image(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded image bytes -> RGB PIL image; ValueError for non-images and images over `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise OverflowError(
                f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
            )
        image.load()
    except Image.DecompressionBombError:  # PIL's own pixel limit, above ours: still an image too large
        raise OverflowError(f"image has more pixels than the limit of {max_pixels}") from None
    except OSError as error:
        raise ValueError(f"not a decodable image ({type(error).__name__})") from None
    return image.convert("RGB")


def load_prompt_encoder(
    export: AlignerExport, vlm_path: str | None = None, device: str | torch.device = "cpu"
) -> PromptEncoder:
    """The frozen VLM named by the export's config (or `vlm_path`), carrying the exported soft tokens."""
    config = (
        export.config.vlm
        if vlm_path is None
        else type(export.config.vlm)(**{**vars(export.config.vlm), "path": vlm_path})
    )
    encoder = PromptEncoder.from_pretrained(config, device)
    apply_soft_tokens(encoder, export.soft_tokens)
    return encoder.eval()


def decoder_seed(seed: int) -> int:
    """The decoder's noise seed for a request's `seed`: a stream of its own (numpy's SeedSequence of (seed, 1)), so
    the decoder never redraws the aligner's noise (which comes from `seed` itself)."""
    return int(np.random.SeedSequence([seed, DECODER_STREAM]).generate_state(1)[0])


def aligner_noise(seeds: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) float32 starting noise, row i drawn from seed i alone (so batching never changes a result)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


@torch.no_grad()
def align(export: AlignerExport, cond: torch.Tensor, seeds: list[int], steps: int, cfg_scale: float) -> torch.Tensor:
    """Soft-token latents (B, s, d_vlm) -> generated DINOv2 tokens (B, N, D), one seed per row."""
    config = export.aligner.config
    param = next(export.aligner.parameters())
    noise = aligner_noise(seeds, (config.num_tokens, config.token_dim)).to(param.device, param.dtype)
    return sample(
        export.aligner,
        cond.to(param.device, param.dtype),
        (config.num_tokens, config.token_dim),
        steps,
        cfg_scale,
        export.config.flow.solver,
        noise=noise,
    ).float()


def check_decoder_matches(export: AlignerExport, decoder: Decoder) -> None:
    """The TRELLIS condition width must be the aligner's token width."""
    if decoder.cond_dim != export.config.aligner.token_dim:
        raise ValueError(
            f"the TRELLIS checkpoint expects {decoder.cond_dim}-dim condition tokens but the aligner makes "
            f"{export.config.aligner.token_dim}-dim tokens"
        )


@dataclass
class TextTo3D:
    """All three stages in one process: prompt encoder, aligner export, TRELLIS decoder."""

    prompt_encoder: PromptEncoder
    export: AlignerExport
    decoder: Decoder

    @classmethod
    def load(
        cls,
        export_uri: str,
        trellis_uri: str,
        vlm_path: str | None = None,
        device: str = "cpu",
        decoder_stages: str = "auto",
    ) -> "TextTo3D":
        """Load every stage from paths or s3:// URIs; `decoder_stages` as in Decoder.from_pretrained(stages=)."""
        export = load_export(export_uri, device)
        decoder = Decoder.from_pretrained(trellis_uri, device, stages=decoder_stages)
        check_decoder_matches(export, decoder)
        return cls(load_prompt_encoder(export, vlm_path, device), export, decoder)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        image: Image.Image | None,
        seed: int,
        steps: int,
        cfg_scale: float,
        file_format: str,
        target_faces: int | None,
    ) -> bytes:
        """One prompt -> asset bytes in `file_format`."""
        cond = self.prompt_encoder([prompt], None if image is None else [image])  # (1, s, d_vlm)
        tokens = align(self.export, cond, [seed], steps, cfg_scale)  # (1, N, D)
        mesh = self.decoder.generate(tokens, seed=decoder_seed(seed))[0]
        return export_mesh(mesh, file_format, target_faces)
