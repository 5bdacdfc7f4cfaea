"""Per-stage latency of the TRELLIS decoder; one JSON line per figure (median over repeats).

    python benchmarks/decoder.py                                  # tiny preset, CPU
    python benchmarks/decoder.py --preset official --device cuda --dtype float16 --batch 1

The official preset builds the release's stage-1 architectures with random weights (no checkpoint
needed), so its figures are the cost of the real model sizes; its occupancy, and so the mesh stage on
its output, is arbitrary: `coarse_mesh_sphere` times meshing a fixed sphere for a comparable figure.
"""

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from gap3d.trellis.config import SPARSE_STRUCTURE_DECODER, SPARSE_STRUCTURE_FLOW, PipelineConfig
from gap3d.trellis.decoder import Decoder, per_sample_seeds
from gap3d.trellis.factory import (
    OFFICIAL_SLAT_SAMPLER,
    OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_SAMPLER,
    write_tiny_trellis,
)
from gap3d.trellis.loading import build_model
from gap3d.trellis.mesh_export import export_mesh
from gap3d.trellis.voxel_mesh import occupancy_mesh


def official_decoder(device: torch.device, dtype: torch.dtype) -> Decoder:
    """The release's stage-1 sizes with random weights."""
    models = {
        SPARSE_STRUCTURE_FLOW: build_model({"name": "SparseStructureFlowModel", "args": OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS}, device=device),
        SPARSE_STRUCTURE_DECODER: build_model({"name": "SparseStructureDecoder", "args": OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS}, device=device),
    }
    for model in models.values():
        for param in model.parameters():
            param.data.normal_(0, 0.02)
        model.eval().requires_grad_(False)
    pipeline = PipelineConfig(models={name: name for name in models}, sparse_structure_sampler=OFFICIAL_SPARSE_STRUCTURE_SAMPLER, slat_sampler=OFFICIAL_SLAT_SAMPLER)
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


def sphere_logits(resolution: int = 64, radius: float = 0.35) -> torch.Tensor:
    centres = (np.arange(resolution) + 0.5) / resolution - 0.5
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    return torch.tensor(radius - np.sqrt(x**2 + y**2 + z**2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "official"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="torso dtype of both models")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1374, help="condition tokens per sample")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: pipeline.json's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.preset == "tiny":
        decoder = Decoder.from_pretrained(str(write_tiny_trellis(tempfile.mkdtemp(prefix="trellis-tiny-"))), device=device, dtype=dtype)
    else:
        decoder = official_decoder(device, dtype)
    cond = torch.randn(args.batch, args.tokens, decoder.cond_dim, device=device)
    steps = args.steps or decoder.pipeline.sparse_structure_sampler.steps
    seeds = per_sample_seeds(0, args.batch)
    flow, ss_decoder = decoder.flow_model, decoder.models[SPARSE_STRUCTURE_DECODER]
    noise = decoder.noise(seeds)
    common = {"benchmark": "decoder", "preset": args.preset, "device": str(device), "dtype": args.dtype, "batch": args.batch, "tokens": args.tokens}

    def emit(stage: str, seconds: float, **extra) -> None:
        print(json.dumps({**common, "stage": stage, "median_s": round(seconds, 5), "repeats": args.repeats, **extra}), flush=True)

    with torch.no_grad():
        seconds, _ = timed(lambda: flow(noise, torch.full((args.batch,), 500.0, device=device), cond), args.repeats, device)
        emit("ss_flow_forward", seconds)
        seconds, latent = timed(lambda: decoder.sparse_structure_sampler.sample(flow, noise, cond, steps=steps), args.repeats, device)
        emit("ss_flow_sampling", seconds, steps=steps)
        seconds, logits = timed(lambda: ss_decoder(latent), args.repeats, device)
        emit("ss_decoder", seconds)
    occupancy = logits[0, 0].float()
    seconds, mesh = timed(lambda: occupancy_mesh(occupancy), args.repeats, device)
    emit("coarse_mesh", seconds, faces=len(mesh.faces), occupied_voxels=int((occupancy > 0).sum()))
    seconds, sphere = timed(lambda: occupancy_mesh(sphere_logits()), args.repeats, device)
    emit("coarse_mesh_sphere", seconds, faces=len(sphere.faces))
    if len(mesh.faces):
        seconds, data = timed(lambda: export_mesh(mesh, "glb"), args.repeats, device)
        emit("export_glb", seconds, megabytes=round(len(data) / 1e6, 2))


if __name__ == "__main__":
    main()
