"""Tiny TRELLIS checkpoints: the release's architectures at toy width/depth with random weights,
written in the release's on-disk layout (pipeline.json + ckpts/<stem>.json + ckpts/<stem>.safetensors),
so tests, the demo and serving run the real loading and sampling code on CPU in seconds.

The writer is data-driven: a dict of pipeline model name -> ModelSpec. Stage-2 models join by
adding their specs (see `tiny_model_specs` and `write_trellis_checkpoint`).
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gap3d.trellis.config import SPARSE_STRUCTURE_DECODER, SPARSE_STRUCTURE_FLOW, PipelineConfig, SamplerConfig
from gap3d.trellis.loading import build_model
from gap3d.trellis.sampler import FlowEulerSampler
from gap3d.trellis.sparse_structure_decoder import UpsampleBlock3d

logger = logging.getLogger(__name__)

# The release's stage-1 architectures (TRELLIS-image-large ckpts/*.json "args").
OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS = {
    "resolution": 16,
    "in_channels": 8,
    "out_channels": 8,
    "model_channels": 1024,
    "cond_channels": 1024,
    "num_blocks": 24,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 1,
    "pe_mode": "ape",
    "qk_rms_norm": True,
    "use_fp16": True,
}
OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS = {
    "out_channels": 1,
    "latent_channels": 8,
    "num_res_blocks": 2,
    "num_res_blocks_middle": 2,
    "channels": [512, 128, 32],
    "use_fp16": True,
}
# Sampler settings of the release's pipeline.json.
OFFICIAL_SPARSE_STRUCTURE_SAMPLER = SamplerConfig(steps=25, cfg_strength=7.5, cfg_interval=(0.5, 1.0), rescale_t=3.0)
OFFICIAL_SLAT_SAMPLER = SamplerConfig(steps=25, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
# Share of voxels the tiny decoder marks occupied on a probe latent: a visible, non-trivial shape.
TINY_OCCUPANCY = 0.05
# Scale of the tiny flow's output layer. A full-size random velocity swamps the noise, and occupancy
# then swings from empty to full between conditions; a small one keeps every sample a few blobs.
TINY_FLOW_OUTPUT_SCALE = 0.05


@dataclass
class ModelSpec:
    stem: str  # checkpoint stem under the root, e.g. "ckpts/ss_flow_tiny"
    class_name: str  # TRELLIS class name, a key of loading.MODEL_MODULES
    args: dict = field(default_factory=dict)  # constructor args, the JSON "args"


def tiny_model_specs(cond_dim: int = 64) -> dict[str, ModelSpec]:
    """Stage-1 models at toy sizes; `cond_dim` must match the condition tokens (tiny DINOv2's hidden size)."""
    flow_args = {
        **OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
        "model_channels": 32,
        "cond_channels": cond_dim,
        "num_blocks": 2,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 2,
        "use_fp16": False,
    }
    decoder_args = {**OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS, "num_res_blocks": 1, "num_res_blocks_middle": 1, "channels": [32, 16, 8], "use_fp16": False}
    return {
        SPARSE_STRUCTURE_FLOW: ModelSpec("ckpts/ss_flow_img_dit_tiny", "SparseStructureFlowModel", flow_args),
        SPARSE_STRUCTURE_DECODER: ModelSpec("ckpts/ss_dec_conv3d_tiny", "SparseStructureDecoder", decoder_args),
    }


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Random weights everywhere (TRELLIS zero-inits gates and outputs, which would make a tiny model inert)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif param.ndim > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def smooth_random_convs(decoder: nn.Module, generator: torch.Generator) -> None:
    """Give the tiny decoder's convs random channel mixing over a fixed blur kernel, and make each
    upsampler copy a cell to all 8 children, so the 64^3 logits vary smoothly: a few blobs, not noise
    (random 3x3x3 kernels give a speckle whose mesh has ~10^5 faces)."""
    blur = torch.tensor([1.0, 2.0, 1.0])
    kernel = blur[:, None, None] * blur[None, :, None] * blur[None, None, :]
    kernel = kernel / kernel.sum()  # (3, 3, 3), sums to 1
    upsamplers = [block.conv for block in decoder.blocks if isinstance(block, UpsampleBlock3d)]
    with torch.no_grad():
        for module in decoder.modules():
            if not isinstance(module, nn.Conv3d) or module.kernel_size != (3, 3, 3):
                continue
            out_channels, in_channels = module.weight.shape[:2]
            copies = 8 if any(module is conv for conv in upsamplers) else 1
            mixing = torch.randn(out_channels // copies, in_channels, generator=generator) / in_channels**0.5
            mixing = mixing.repeat_interleave(copies, dim=0)  # pixel shuffle reads channel c * 8 + offset
            module.weight.copy_(mixing[:, :, None, None, None] * kernel)


def calibrate_occupancy(flow: nn.Module, decoder: nn.Module, sampler: SamplerConfig, generator: torch.Generator) -> None:
    """Shift the tiny decoder's output bias so that on probe stage-1 samples (random conditions) the
    median share of occupied voxels is TINY_OCCUPANCY."""
    config = flow.config
    noise = torch.randn(4, config.in_channels, *[config.resolution] * 3, generator=generator)
    cond = torch.randn(4, 16, config.cond_channels, generator=generator)
    with torch.no_grad():
        logits = decoder(FlowEulerSampler(sampler).sample(flow, noise, cond)).flatten(1)  # (4, R^3)
        thresholds = torch.quantile(logits, 1.0 - TINY_OCCUPANCY, dim=1)
        decoder.out_layer[-1].bias -= thresholds.median()


def write_trellis_checkpoint(out_dir: str | Path, specs: dict[str, ModelSpec], models: dict[str, nn.Module], pipeline: PipelineConfig) -> Path:
    """Write pipeline.json and, per model, <stem>.json + <stem>.safetensors under `out_dir`."""
    root = Path(out_dir)
    for name, spec in specs.items():
        stem_path = root / spec.stem
        stem_path.parent.mkdir(parents=True, exist_ok=True)
        stem_path.with_suffix(".json").write_text(json.dumps({"name": spec.class_name, "args": spec.args}, indent=2))
        state = {key: tensor.detach().contiguous().cpu() for key, tensor in models[name].state_dict().items()}
        save_file(state, str(stem_path.with_suffix(".safetensors")))
    (root / "pipeline.json").write_text(json.dumps(pipeline.to_json(), indent=2))
    return root


def write_tiny_trellis(
    out_dir: str | Path,
    cond_dim: int = 64,
    seed: int = 0,
    steps: int = 4,
    extra_specs: dict[str, ModelSpec] | None = None,
    slat_normalization: dict[str, list[float]] | None = None,
) -> Path:
    """A tiny random TRELLIS checkpoint in the release layout at `out_dir`; returns its path.

    The release's sampler settings are kept except `steps` (few, for speed). `extra_specs` adds
    models (e.g. stage 2) to ckpts/ and pipeline.json; `slat_normalization` goes to pipeline.json.
    """
    specs = {**tiny_model_specs(cond_dim), **(extra_specs or {})}
    generator = torch.Generator().manual_seed(seed)
    models = {}
    for name, spec in specs.items():
        models[name] = build_model({"name": spec.class_name, "args": spec.args}, f"tiny spec {name}")
        randomize(models[name], generator)
    smooth_random_convs(models[SPARSE_STRUCTURE_DECODER], generator)
    with torch.no_grad():
        for param in models[SPARSE_STRUCTURE_FLOW].out_layer.parameters():
            param.mul_(TINY_FLOW_OUTPUT_SCALE)
    sampler = SamplerConfig(**{**OFFICIAL_SPARSE_STRUCTURE_SAMPLER.__dict__, "steps": steps})
    calibrate_occupancy(models[SPARSE_STRUCTURE_FLOW], models[SPARSE_STRUCTURE_DECODER], sampler, generator)
    slat_sampler = SamplerConfig(**{**OFFICIAL_SLAT_SAMPLER.__dict__, "steps": steps})
    pipeline = PipelineConfig(
        models={name: spec.stem for name, spec in specs.items()},
        sparse_structure_sampler=sampler,
        slat_sampler=slat_sampler,
        slat_normalization=slat_normalization,
    )
    root = write_trellis_checkpoint(out_dir, specs, models, pipeline)
    logger.info("wrote tiny TRELLIS checkpoint (cond_dim %d) to %s", cond_dim, root)
    return root
