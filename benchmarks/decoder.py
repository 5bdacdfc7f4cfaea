"""Per-stage latency of the TRELLIS decoder; one JSON line per figure (median over repeats).

    python benchmarks/decoder.py                                  # tiny preset, CPU, both stages
    python benchmarks/decoder.py --preset official --device cuda --dtype float16 --batch 1

Stages: stage-1 flow (one forward, full sampling), VAE decode to 64^3 logits, coarse mesh, stage-2 flow
sampling, mesh decoder forward, mesh extraction (+ cleanup), GLB export (default simplification).
The official preset builds the release's architectures with random weights (no checkpoint needed), so
its figures are the cost of the real model sizes; its stage-1 occupancy is arbitrary, so stage 2 runs on
a fixed spherical shell of voxels (`--shell-radius`, about the size of a real structure) instead, and its
extracted "mesh" is noise: the extraction and export figures are an upper bound there.
"""

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

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
)
from gap3d.trellis.decoder import Decoder, per_sample_seeds
from gap3d.trellis.loading import build_model
from gap3d.trellis.mesh_cleanup import remove_hidden_components
from gap3d.trellis.mesh_export import export_mesh
from gap3d.trellis.voxel_mesh import occupancy_mesh
from miniature.checkpoints.trellis import write_tiny_trellis

OFFICIAL_MODELS = {
    SPARSE_STRUCTURE_FLOW: ("SparseStructureFlowModel", OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS),
    SPARSE_STRUCTURE_DECODER: ("SparseStructureDecoder", OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS),
    SLAT_FLOW: ("SLatFlowModel", OFFICIAL_SLAT_FLOW_ARGS),
    SLAT_DECODER_MESH: ("SLatMeshDecoder", OFFICIAL_SLAT_MESH_DECODER_ARGS),
}


def official_decoder(device: torch.device, dtype: torch.dtype) -> Decoder:
    """The release's sizes, both stages, with random weights."""
    models = {
        name: build_model({"name": cls, "args": args}, device=device) for name, (cls, args) in OFFICIAL_MODELS.items()
    }
    for model in models.values():
        for param in model.parameters():
            param.data.normal_(0, 0.02)
        model.eval().requires_grad_(False)
    normalization = {"mean": [0.0] * 8, "std": [1.0] * 8}
    pipeline = PipelineConfig(
        models={name: name for name in models},
        sparse_structure_sampler=OFFICIAL_SPARSE_STRUCTURE_SAMPLER,
        slat_sampler=OFFICIAL_SLAT_SAMPLER,
        slat_normalization=normalization,
    )
    return Decoder(pipeline, models, device, dtype)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def shell_occupancy(resolution: int = 64, radius: float = 0.35) -> torch.Tensor:
    """(R, R, R) bool: voxels within one voxel of a sphere of `radius` (a surface shell like TRELLIS's)."""
    centres = (np.arange(resolution) + 0.5) / resolution - 0.5
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    return torch.tensor(np.abs(np.sqrt(x**2 + y**2 + z**2) - radius) < 1.0 / resolution)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "official"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="torso dtype of the models"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1374, help="condition tokens per sample")
    parser.add_argument(
        "--steps", type=int, default=None, help="sampler steps of both stages (default: pipeline.json's)"
    )
    parser.add_argument(
        "--shell-radius", type=float, default=0.35, help="official preset: radius of the stage-2 voxel shell"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.preset == "tiny":
        decoder = Decoder.from_pretrained(
            str(write_tiny_trellis(tempfile.mkdtemp(prefix="trellis-tiny-"))), device=device, dtype=dtype
        )
    else:
        decoder = official_decoder(device, dtype)
    cond = torch.randn(args.batch, args.tokens, decoder.cond_dim, device=device)
    steps = args.steps or decoder.pipeline.sparse_structure_sampler.steps
    slat_steps = args.steps or decoder.pipeline.slat_sampler.steps
    seeds = per_sample_seeds(0, args.batch)
    flow, ss_decoder = decoder.flow_model, decoder.models[SPARSE_STRUCTURE_DECODER]
    noise = decoder.noise(seeds)
    common = {
        "benchmark": "decoder",
        "preset": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "tokens": args.tokens,
    }

    def emit(stage: str, seconds: float, **extra) -> None:
        print(
            json.dumps({**common, "stage": stage, "median_s": round(seconds, 5), "repeats": args.repeats, **extra}),
            flush=True,
        )

    with torch.no_grad():
        seconds, _ = timed(
            lambda: flow(noise, torch.full((args.batch,), 500.0, device=device), cond), args.repeats, device
        )
        emit("ss_flow_forward", seconds)
        seconds, latent = timed(
            lambda: decoder.sparse_structure_sampler.sample(flow, noise, cond, steps=steps), args.repeats, device
        )
        emit("ss_flow_sampling", seconds, steps=steps)
        seconds, logits = timed(lambda: ss_decoder(latent), args.repeats, device)
        emit("ss_vae_decode", seconds)
    occupancy = logits[0, 0].float()
    seconds, mesh = timed(lambda: occupancy_mesh(occupancy), args.repeats, device)
    emit("coarse_mesh", seconds, faces=len(mesh.faces), occupied_voxels=int((occupancy > 0).sum()))
    if len(mesh.faces):
        seconds, data = timed(lambda: export_mesh(mesh, "glb"), args.repeats, device)
        emit("coarse_export_glb", seconds, megabytes=round(len(data) / 1e6, 3))
    occupancies = (
        logits[:, 0] > 0
        if args.preset == "tiny"
        else shell_occupancy(radius=args.shell_radius).expand(args.batch, -1, -1, -1)
    )
    voxels = [torch.argwhere(grid).int().to(device) for grid in occupancies]
    if any(v.shape[0] == 0 for v in voxels):
        raise SystemExit("a stage-1 structure is empty; try another --tokens or --batch")
    counts = {"voxels": [v.shape[0] for v in voxels]}
    params = {"steps": slat_steps}
    seconds, slat = timed(lambda: decoder.sample_structured_latent(cond, voxels, seeds, params), args.repeats, device)
    emit("slat_flow_sampling", seconds, steps=slat_steps, **counts)
    mesh_decoder = decoder.models[SLAT_DECODER_MESH]
    with torch.no_grad():
        seconds, cubes = timed(lambda: mesh_decoder(slat), args.repeats, device)
    emit("slat_mesh_decode", seconds, cubes=cubes.feats.shape[0], **counts)
    seconds, meshes = timed(
        lambda: [remove_hidden_components(m) for m in mesh_decoder.to_meshes(cubes)], args.repeats, device
    )
    emit("mesh_extraction", seconds, faces=[len(m.faces) for m in meshes])
    seconds, data = timed(lambda: export_mesh(meshes[0], "glb"), args.repeats, device)
    emit("full_export_glb", seconds, megabytes=round(len(data) / 1e6, 3))
    seconds, _ = timed(
        lambda: decoder.generate(cond, seed=seeds, steps=steps, slat_sampler_params=params, allow_empty=True),
        args.repeats,
        device,
    )
    emit("generate_full_end_to_end", seconds)


if __name__ == "__main__":
    main()
