"""TRELLIS image-to-3D as a decoder of condition tokens: (B, N, D) tokens -> meshes.

Stage 1 (here): the sparse-structure flow samples a 16^3 latent, the VAE decoder turns it into 64^3
occupancy logits, and `occupancy_mesh` gives a coarse watertight mesh. Stage 2 (structured latent flow
+ mesh decoder) plugs in behind `generate(..., stage="full")`, starting from `SparseStructure.coords`.
The condition may come from our aligner or from DINOv2 on a photo; only its shape matters.
"""

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import trimesh
from torch import nn

from gap3d.trellis.config import SPARSE_STRUCTURE_DECODER, SPARSE_STRUCTURE_FLOW, STAGE1_MODELS, PipelineConfig
from gap3d.trellis.loading import load_pipeline
from gap3d.trellis.mesh_export import export_mesh
from gap3d.trellis.sampler import FlowEulerSampler
from gap3d.trellis.voxel_mesh import occupancy_mesh

logger = logging.getLogger(__name__)

STAGES = ("coarse", "full")


class EmptyStructureError(ValueError):
    """Stage 1 decoded to a grid with no occupied voxel, so there is nothing to mesh."""


@dataclass
class SparseStructure:
    """Stage-1 result for a batch of B samples."""

    logits: torch.Tensor  # (B, R, R, R) float32 occupancy logits, R = 64 in the release
    seeds: list[int]  # noise seed of each sample

    @property
    def occupancy(self) -> torch.Tensor:
        """(B, R, R, R) bool: voxels with logit > 0."""
        return self.logits > 0

    @property
    def coords(self) -> torch.Tensor:
        """(M, 4) int32 [sample index, x, y, z] of occupied voxels: the input layout of TRELLIS stage 2."""
        return torch.argwhere(self.occupancy).int()

    def num_voxels(self) -> list[int]:
        """Occupied voxel count per sample."""
        return self.occupancy.flatten(1).sum(1).tolist()


def per_sample_seeds(seed: int | Sequence[int], batch_size: int) -> list[int]:
    """One seed per sample: an int gives seed, seed + 1, ...; a sequence is taken as is."""
    seeds = [int(seed) + index for index in range(batch_size)] if isinstance(seed, numbers.Integral) else [int(s) for s in seed]
    if len(seeds) != batch_size:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size} conditions")
    return seeds


def default_dtype(device: torch.device, use_fp16: bool) -> torch.dtype:
    """fp16 torsos on CUDA where the checkpoint was trained for it, float32 otherwise."""
    return torch.float16 if device.type == "cuda" and use_fp16 else torch.float32


class Decoder:
    """Condition tokens -> meshes with TRELLIS; `from_pretrained` loads a release-layout directory or s3:// URI."""

    def __init__(self, pipeline: PipelineConfig, models: dict[str, nn.Module], device: torch.device, dtype: torch.dtype | None = None):
        self.pipeline = pipeline
        self.models = models
        self.device = device
        for model in models.values():
            model.to(device)
            model.set_torso_dtype(dtype or default_dtype(device, model.config.use_fp16))
        self.sparse_structure_sampler = FlowEulerSampler(pipeline.sparse_structure_sampler)

    @classmethod
    def from_pretrained(cls, uri: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Decoder":
        """Load the stage-1 models of a TRELLIS checkpoint (directory or s3:// URI) onto `device` (default: CUDA if present)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipeline, models = load_pipeline(uri, STAGE1_MODELS, device)
        return cls(pipeline, models, device, dtype)

    @property
    def flow_model(self) -> nn.Module:
        return self.models[SPARSE_STRUCTURE_FLOW]

    @property
    def cond_dim(self) -> int:
        """Feature size of the condition tokens the checkpoint expects (1024 for the release)."""
        return self.flow_model.config.cond_channels

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """(B, C, R, R, R) float32 stage-1 noise, each sample from its own seed (same on CPU and GPU)."""
        config = self.flow_model.config
        shape = (config.in_channels, config.resolution, config.resolution, config.resolution)
        samples = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        return torch.stack(samples).to(self.device)

    def _check_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim or cond.shape[0] == 0:
            raise ValueError(f"cond must be (B, N, {self.cond_dim}) with B >= 1, got {tuple(cond.shape)}")
        return cond.to(self.device, torch.float32)

    @torch.no_grad()
    def sample_sparse_structure(
        self,
        cond: torch.Tensor,
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        cfg_strength: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        rescale_t: float | None = None,
    ) -> SparseStructure:
        """Stage 1: cond (B, N, D) -> 64^3 occupancy logits. None arguments come from pipeline.json."""
        cond = self._check_cond(cond)
        seeds = per_sample_seeds(seed, cond.shape[0])
        latent = self.sparse_structure_sampler.sample(
            self.flow_model,
            self.noise(seeds),
            cond,
            steps=steps,
            cfg_strength=cfg_strength,
            cfg_interval=cfg_interval,
            rescale_t=rescale_t,
        )  # (B, 8, 16, 16, 16)
        logits = self.models[SPARSE_STRUCTURE_DECODER](latent)  # (B, 1, 64, 64, 64)
        structure = SparseStructure(logits=logits[:, 0].float(), seeds=seeds)
        logger.debug("stage 1: occupied voxels per sample %s", structure.num_voxels())
        return structure

    def coarse_meshes(self, structure: SparseStructure, allow_empty: bool = False) -> list[trimesh.Trimesh]:
        """One watertight mesh per sample from its occupancy logits; an empty grid raises unless allow_empty."""
        meshes = [occupancy_mesh(logits) for logits in structure.logits]
        for index, mesh in enumerate(meshes):
            if len(mesh.faces) == 0 and not allow_empty:
                raise EmptyStructureError(
                    f"sample {index} (seed {structure.seeds[index]}) decoded to an empty occupancy grid; "
                    "try another seed or condition, or pass allow_empty=True to get an empty mesh"
                )
        return meshes

    def generate(
        self,
        cond: torch.Tensor,
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        cfg_strength: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        rescale_t: float | None = None,
        stage: str = "coarse",
        allow_empty: bool = False,
    ) -> list[trimesh.Trimesh]:
        """cond (B, N, D) -> B meshes in [-0.5, 0.5]^3. stage "coarse" meshes the stage-1 occupancy."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if stage == "full":
            raise NotImplementedError("stage 2 (structured latent flow + mesh decoder) is not built yet; use stage='coarse'")
        structure = self.sample_sparse_structure(cond, seed, steps, cfg_strength, cfg_interval, rescale_t)
        return self.coarse_meshes(structure, allow_empty)

    def generate_bytes(self, cond: torch.Tensor, file_format: str = "glb", target_faces: int | None = None, **kwargs) -> list[bytes]:
        """`generate`, then each mesh as GLB / OBJ / PLY bytes (optionally simplified to target_faces)."""
        return [export_mesh(mesh, file_format, target_faces) for mesh in self.generate(cond, **kwargs)]
