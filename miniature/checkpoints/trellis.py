"""Tiny TRELLIS checkpoints: the release's architectures at toy width/depth with random weights,
written in the release's on-disk layout (pipeline.json + ckpts/<stem>.json + ckpts/<stem>.safetensors),
so tests and serving run the real loading and sampling code on CPU in seconds.

The writer is data-driven: a dict of pipeline model name -> ModelSpec (see `tiny_model_specs`,
`tiny_stage2_specs` and `write_trellis_checkpoint`). Random weights are shaped just enough that
outputs look like objects: a few smooth blobs in stage 1, a surface hugging the voxels in stage 2.
"""

import logging
from pathlib import Path

import torch
from torch import nn

from gap3d.trellis.config import (
    OFFICIAL_SLAT_FLOW_ARGS,
    OFFICIAL_SLAT_MESH_DECODER_ARGS,
    OFFICIAL_SLAT_SAMPLER,
    OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_SAMPLER,
    SLAT_DECODER_MESH,
    SLAT_FLOW,
    SPARSE_STRUCTURE_DECODER,
    SPARSE_STRUCTURE_FLOW,
    PipelineConfig,
    SamplerConfig,
)
from gap3d.trellis.loading import ModelSpec, build_model, write_trellis_checkpoint
from gap3d.trellis.mesh_extraction import NUM_WEIGHTS
from gap3d.trellis.sampler import FlowEulerSampler
from gap3d.trellis.sparse_structure_decoder import UpsampleBlock3d

logger = logging.getLogger(__name__)

# A tiny SLatFlowModel (same code path, toy sizes) for tests and the demo: runs on CPU in well under a
# second per step. `tiny_stage2_specs` sets cond_channels to its condition width.
TINY_SLAT_FLOW_ARGS = {
    "resolution": 16,
    "in_channels": 8,
    "out_channels": 8,
    "model_channels": 64,
    "cond_channels": 64,
    "num_blocks": 2,
    "num_heads": 4,
    "mlp_ratio": 2,
    "patch_size": 2,
    "num_io_res_blocks": 2,
    "io_block_channels": [32],
    "pe_mode": "ape",
    "qk_rms_norm": True,
}

# A tiny SLatMeshDecoder for tests and the demo. 256 is the smallest width the fixed GroupNorm(32) of
# the subdivision blocks allows; two blocks and a handful of voxels keep it at a fraction of a second.
TINY_SLAT_MESH_DECODER_ARGS = {
    "resolution": 16,
    "model_channels": 256,
    "latent_channels": 8,
    "num_blocks": 2,
    "num_heads": 4,
    "mlp_ratio": 2,
    "attn_mode": "swin",
    "window_size": 4,
    "pe_mode": "ape",
    "representation_config": {"use_color": True},
}

# Share of voxels the tiny decoder marks occupied on a probe latent: a visible, non-trivial shape of
# about 1k voxels, which keeps the tiny stage 2 (64 cubes per voxel) around a second on a CPU.
TINY_OCCUPANCY = 0.004
# Scale of the tiny flow's output layer. A full-size random velocity swamps the noise, and occupancy
# then swings from empty to full between conditions; a small one keeps every sample a few blobs.
TINY_FLOW_OUTPUT_SCALE = 0.05
# Tiny mesh decoder outputs: an SDF of TINY_SDF_BIAS (inside) plus a small random part, so the surface
# follows the boundary of the voxels with some relief; colours mid-grey plus a random tint.
TINY_SDF_BIAS = -0.2
TINY_SDF_SCALE = 0.1
TINY_COLOR_BIAS = 0.5
TINY_COLOR_SCALE = 0.3

# TRELLIS-image-large's models and checkpoint stems, for random release-size checkpoints (the GPU check).
RELEASE_MODELS = {
    SPARSE_STRUCTURE_FLOW: ("SparseStructureFlowModel", OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS),
    SPARSE_STRUCTURE_DECODER: ("SparseStructureDecoder", OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS),
    SLAT_FLOW: ("SLatFlowModel", OFFICIAL_SLAT_FLOW_ARGS),
    SLAT_DECODER_MESH: ("SLatMeshDecoder", OFFICIAL_SLAT_MESH_DECODER_ARGS),
}
RELEASE_STEMS = {
    SPARSE_STRUCTURE_FLOW: "ckpts/ss_flow_img_dit_L_16l8_fp16",
    SPARSE_STRUCTURE_DECODER: "ckpts/ss_dec_conv3d_16l8_fp16",
    SLAT_FLOW: "ckpts/slat_flow_img_dit_L_64l8p2_fp16",
    SLAT_DECODER_MESH: "ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16",
}
# A real object's structure: about 12k of the 64^3 voxels (benchmarks/decoder.py's shell holds 12,496).
RELEASE_OCCUPANCY = 0.05


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
    decoder_args = {
        **OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS,
        "num_res_blocks": 1,
        "num_res_blocks_middle": 1,
        "channels": [32, 16, 8],
        "use_fp16": False,
    }
    return {
        SPARSE_STRUCTURE_FLOW: ModelSpec("ckpts/ss_flow_img_dit_tiny", "SparseStructureFlowModel", flow_args),
        SPARSE_STRUCTURE_DECODER: ModelSpec("ckpts/ss_dec_conv3d_tiny", "SparseStructureDecoder", decoder_args),
    }


def tiny_stage2_specs(cond_dim: int = 64) -> dict[str, ModelSpec]:
    """Stage-2 models at toy sizes on the stage-1 grid (64^3); `cond_dim` as in `tiny_model_specs`."""
    flow_args = {**TINY_SLAT_FLOW_ARGS, "resolution": 64, "cond_channels": cond_dim}
    decoder_args = {**TINY_SLAT_MESH_DECODER_ARGS, "resolution": 64}
    return {
        SLAT_FLOW: ModelSpec("ckpts/slat_flow_img_dit_tiny", "SLatFlowModel", flow_args),
        SLAT_DECODER_MESH: ModelSpec("ckpts/slat_dec_mesh_swin_tiny", "SLatMeshDecoder", decoder_args),
    }


def tiny_slat_normalization(generator: torch.Generator, channels: int = 8) -> dict[str, list[float]]:
    """Random per-channel mean and std, as pipeline.json's slat_normalization holds."""
    mean = 0.2 * torch.randn(channels, generator=generator)
    std = 0.5 + torch.rand(channels, generator=generator)
    return {"mean": [round(float(v), 4) for v in mean], "std": [round(float(v), 4) for v in std]}


def shape_tiny_mesh_decoder(decoder: nn.Module) -> None:
    """Make the random mesh decoder predict an inside SDF with relief and mid-grey colours (see TINY_SDF_*)."""
    layer = decoder.out_layer
    with torch.no_grad():
        layer.weight[:8].mul_(TINY_SDF_SCALE)
        layer.bias[:8] = TINY_SDF_BIAS
        layer.weight[8 : 32 + NUM_WEIGHTS].mul_(TINY_SDF_SCALE)
        layer.bias[8 : 32 + NUM_WEIGHTS] = 0.0
        layer.weight[32 + NUM_WEIGHTS :].mul_(TINY_COLOR_SCALE)
        layer.bias[32 + NUM_WEIGHTS :] = TINY_COLOR_BIAS


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


def calibrate_occupancy(
    flow: nn.Module,
    decoder: nn.Module,
    sampler: SamplerConfig,
    generator: torch.Generator,
    occupancy: float = TINY_OCCUPANCY,
    cond: torch.Tensor | None = None,
) -> None:
    """Shift the random decoder's output bias so that on probe stage-1 samples of `cond` ((n, N, D); default four
    random conditions) the median share of occupied voxels is `occupancy`. The probes run on the flow's device."""
    config, device = flow.config, next(flow.parameters()).device
    probes = 4 if cond is None else len(cond)
    noise = torch.randn(probes, config.in_channels, *[config.resolution] * 3, generator=generator).to(device)
    if cond is None:
        cond = torch.randn(probes, 16, config.cond_channels, generator=generator)
    cond = cond.to(device)
    with torch.no_grad():
        logits = decoder(FlowEulerSampler(sampler).sample(flow, noise, cond)).flatten(1)  # (probes, R^3)
        thresholds = torch.quantile(logits, 1.0 - occupancy, dim=1)
        decoder.out_layer[-1].bias -= thresholds.median()


def write_tiny_trellis(
    out_dir: str | Path,
    cond_dim: int = 64,
    seed: int = 0,
    steps: int = 4,
    extra_specs: dict[str, ModelSpec] | None = None,
    slat_normalization: dict[str, list[float]] | None = None,
    stage2: bool = True,
    calibration_cond: torch.Tensor | None = None,
) -> Path:
    """A tiny random TRELLIS checkpoint in the release layout at `out_dir`; returns its path.

    The release's sampler settings are kept except `steps` (few, for speed). `stage2` adds the tiny
    structured-latent flow and mesh decoder (and a random slat_normalization unless one is given);
    `extra_specs` adds or replaces models in ckpts/ and pipeline.json. `calibration_cond` (n, N, cond_dim): the
    conditions stage 1's occupancy is calibrated on, such as the tokens of the aligner it will decode; default random.
    """
    specs = {**tiny_model_specs(cond_dim), **(tiny_stage2_specs(cond_dim) if stage2 else {}), **(extra_specs or {})}
    root = write_random_trellis(out_dir, specs, steps, seed, slat_normalization, calibration_cond=calibration_cond)
    logger.info("wrote tiny TRELLIS checkpoint (cond_dim %d) to %s", cond_dim, root)
    return root


def write_release_size_trellis(out_dir: str | Path, device: str | torch.device = "cuda", seed: int = 0) -> Path:
    """A random TRELLIS-image-large: the release's architectures, checkpoint stems and samplers (25 steps), its
    stage-1 occupancy calibrated on `device` to an object's share of the grid, so stage 2 decodes an object-sized
    structure. Float32 weights, about 4.5 GB."""
    specs = {
        name: ModelSpec(RELEASE_STEMS[name], class_name, args) for name, (class_name, args) in RELEASE_MODELS.items()
    }
    steps = OFFICIAL_SPARSE_STRUCTURE_SAMPLER.steps
    return write_random_trellis(out_dir, specs, steps, seed, device=device, occupancy=RELEASE_OCCUPANCY)


def write_random_trellis(
    out_dir: str | Path,
    specs: dict[str, ModelSpec],
    steps: int,
    seed: int,
    slat_normalization: dict[str, list[float]] | None = None,
    device: str | torch.device = "cpu",
    occupancy: float = TINY_OCCUPANCY,
    calibration_cond: torch.Tensor | None = None,
) -> Path:
    """Random weights for `specs` (shaped as the TINY_* constants say), stage-1 occupancy calibrated on `device`
    (on `calibration_cond`, default random conditions), the release's samplers at `steps`, written in the release
    layout at `out_dir`."""
    generator = torch.Generator().manual_seed(seed)
    if SLAT_FLOW in specs and slat_normalization is None:
        slat_normalization = tiny_slat_normalization(generator)
    models = {}
    for name, spec in specs.items():
        models[name] = build_model({"name": spec.class_name, "args": spec.args}, f"random spec {name}")
        randomize(models[name], generator)
    smooth_random_convs(models[SPARSE_STRUCTURE_DECODER], generator)
    with torch.no_grad():
        for flow in (SPARSE_STRUCTURE_FLOW, SLAT_FLOW):
            for param in models[flow].out_layer.parameters() if flow in models else ():
                param.mul_(TINY_FLOW_OUTPUT_SCALE)
    if SLAT_DECODER_MESH in models:
        shape_tiny_mesh_decoder(models[SLAT_DECODER_MESH])
    sampler = SamplerConfig(**{**OFFICIAL_SPARSE_STRUCTURE_SAMPLER.__dict__, "steps": steps})
    flow, decoder = (models[name].to(device) for name in (SPARSE_STRUCTURE_FLOW, SPARSE_STRUCTURE_DECODER))
    calibrate_occupancy(flow, decoder, sampler, generator, occupancy, calibration_cond)
    slat_sampler = SamplerConfig(**{**OFFICIAL_SLAT_SAMPLER.__dict__, "steps": steps})
    pipeline = PipelineConfig(
        models={name: spec.stem for name, spec in specs.items()},
        sparse_structure_sampler=sampler,
        slat_sampler=slat_sampler,
        slat_normalization=slat_normalization,
    )
    return write_trellis_checkpoint(out_dir, specs, models, pipeline)
