"""TRELLIS image-to-3D as a decoder of condition tokens: (B, N, D) tokens -> meshes.

Stage 1: the sparse-structure flow samples a 16^3 latent, the VAE decoder turns it into 64^3
occupancy logits; stage "coarse" meshes those directly (`occupancy_mesh`, watertight, blocky).
Stage 2 ("full"): the structured-latent flow samples 8 channels on the occupied voxels, which are
un-normalised with pipeline.json's slat_normalization and decoded to a coloured mesh at 256^3.
Each sample draws its noise from its own seed (stage 1 first, then stage 2 from the same stream), so a
sample's result does not depend on the rest of its batch. Meshes lose cavity walls and specks
(`mesh_cleanup`). The condition may come from our aligner or from DINOv2 on a photo; only its shape matters.
"""

import logging
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import trimesh
from torch import nn

import gap3d.trellis.sparse as sp
from gap3d.cancellation import raise_if_cancelled
from gap3d.trellis.config import (
    SLAT_DECODER_MESH,
    SLAT_FLOW,
    SPARSE_STRUCTURE_DECODER,
    SPARSE_STRUCTURE_FLOW,
    STAGE1_MODELS,
    STAGE2_MODELS,
    PipelineConfig,
)
from gap3d.trellis.loading import load_pipeline
from gap3d.trellis.mesh_cleanup import DEFAULT_MIN_COMPONENT_FACES, remove_hidden_components
from gap3d.trellis.mesh_export import DEFAULT_TARGET_FACES, export_mesh, simplify
from gap3d.trellis.sampler import FlowEulerSampler
from gap3d.trellis.stage2_inputs import DEFAULT_MAX_STAGE2_VOXELS, stage2_voxels, voxel_budget_groups
from gap3d.trellis.structured_latent_flow import sample_structured_latent
from gap3d.trellis.voxel_mesh import empty_mesh, fill_enclosed, occupancy_mesh

logger = logging.getLogger(__name__)

STAGES = ("coarse", "full")
# What `from_pretrained(stages=...)` loads: "auto" adds stage 2 when pipeline.json lists it.
LOAD_STAGES = ("auto", "coarse", "full")
# Coarse meshes are decimated within this many voxels of the marched surface.
COARSE_TOLERANCE_VOXELS = 0.5
# Keys of `generate(slat_sampler_params=...)`: overrides of pipeline.json's slat_sampler params.
SAMPLER_PARAMS = ("steps", "cfg_strength", "cfg_interval", "rescale_t")


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
    seeds = (
        [int(seed) + index for index in range(batch_size)]
        if isinstance(seed, numbers.Integral)
        else [int(s) for s in seed]
    )
    if len(seeds) != batch_size:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size} conditions")
    return seeds


def default_dtype(device: torch.device, use_fp16: bool) -> torch.dtype:
    """fp16 torsos on CUDA where the checkpoint was trained for it, float32 otherwise."""
    return torch.float16 if device.type == "cuda" and use_fp16 else torch.float32


class Decoder:
    """Condition tokens -> meshes with TRELLIS; `from_pretrained` loads a release-layout directory or s3:// URI."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        models: dict[str, nn.Module],
        device: torch.device,
        dtype: torch.dtype | None = None,
        max_stage2_voxels: int = DEFAULT_MAX_STAGE2_VOXELS,
        min_component_faces: int = DEFAULT_MIN_COMPONENT_FACES,
        neg_cond: torch.Tensor | None = None,
    ):
        if max_stage2_voxels < 1:
            raise ValueError(f"max_stage2_voxels must be >= 1, got {max_stage2_voxels}")
        self.pipeline = pipeline
        self.models = models
        self.device = device
        self.max_stage2_voxels = max_stage2_voxels
        self.min_component_faces = min_component_faces
        for model in models.values():
            model.to(device)
            model.set_torso_dtype(dtype or default_dtype(device, model.config.use_fp16))
        if pipeline.text_cond_model is not None and neg_cond is None:
            raise ValueError(
                f"{pipeline.name} guides with the empty caption encoded by {pipeline.text_cond_model}, not zeros: pass "
                "neg_cond (gap3d.text_conditioning.load_text_trellis does)"
            )
        # CFG's negative condition (1, N, D): None is zeros (the image release's); the text release's empty caption.
        self.neg_cond = None if neg_cond is None else neg_cond.to(device, torch.float32)
        self.sparse_structure_sampler = FlowEulerSampler(pipeline.sparse_structure_sampler)
        self.slat_sampler = FlowEulerSampler(pipeline.slat_sampler)
        if self.has_stage2:
            self._check_stage2_models()

    @classmethod
    def from_pretrained(
        cls,
        uri: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stages: str = "auto",
        **settings,
    ) -> "Decoder":
        """Load a TRELLIS checkpoint (directory or s3:// URI) onto `device` (default: CUDA if present).

        stages: "auto" loads stage 2 when pipeline.json lists slat_flow_model and slat_decoder_mesh,
        "coarse" only stage 1, "full" requires stage 2. `settings`: max_stage2_voxels, min_component_faces, neg_cond.
        """
        if stages not in LOAD_STAGES:
            raise ValueError(f"stages must be one of {', '.join(LOAD_STAGES)}, got {stages!r}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        names = STAGE1_MODELS + STAGE2_MODELS if stages == "full" else STAGE1_MODELS
        optional = STAGE2_MODELS if stages == "auto" else ()
        pipeline, models = load_pipeline(uri, names, device, optional=optional)
        return cls(pipeline, models, device, dtype, **settings)

    def _check_stage2_models(self) -> None:
        resolutions = {name: self.models[name].config.resolution for name in STAGE2_MODELS}
        if len(set(resolutions.values())) > 1:
            raise ValueError(f"the stage-2 models disagree on their grid: {resolutions}; they must match")
        factor = self.structure_resolution // self.stage2_resolution
        if factor * self.stage2_resolution != self.structure_resolution or factor & (factor - 1):
            raise ValueError(
                f"the stage-2 models run on a {self.stage2_resolution}^3 grid, but stage 1 decodes a "
                f"{self.structure_resolution}^3 grid; it must be stage 1's, or smaller by a power of two"
            )
        if self.models[SLAT_FLOW].config.cond_channels != self.cond_dim:
            raise ValueError(
                f"{SLAT_FLOW} takes cond_channels {self.models[SLAT_FLOW].config.cond_channels}, stage 1 takes "
                f"{self.cond_dim}; they must match"
            )

    @property
    def flow_model(self) -> nn.Module:
        return self.models[SPARSE_STRUCTURE_FLOW]

    @property
    def structure_resolution(self) -> int:
        """Side of the stage-1 occupancy grid (64 in the release): latent side x 2 per decoder upsampling."""
        return self.flow_model.config.resolution * 2 ** (len(self.models[SPARSE_STRUCTURE_DECODER].config.channels) - 1)

    @property
    def stage2_resolution(self) -> int:
        """Side of the grid stage 2 runs on: stage 1's in the release; a tiny release's may be coarser (CPU budget),
        and stage 2 then takes the structure max-pooled to it."""
        return self.models[SLAT_FLOW].config.resolution

    @property
    def has_stage2(self) -> bool:
        """Whether the stage-2 models are loaded, so that stage "full" is available."""
        return all(name in self.models for name in STAGE2_MODELS)

    @property
    def default_stage(self) -> str:
        """The stage generate() runs by default: "full" when the stage-2 models are loaded, "coarse" otherwise."""
        return "full" if self.has_stage2 else "coarse"

    @property
    def cond_dim(self) -> int:
        """Feature size of the condition tokens the checkpoint expects (1024 for the release)."""
        return self.flow_model.config.cond_channels

    def _stage1_noise_shape(self) -> tuple[int, ...]:
        config = self.flow_model.config
        return (config.in_channels, config.resolution, config.resolution, config.resolution)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """(B, C, R, R, R) float32 stage-1 noise, each sample from its own seed (same on CPU and GPU)."""
        samples = [
            torch.randn(self._stage1_noise_shape(), generator=torch.Generator().manual_seed(seed)) for seed in seeds
        ]
        return torch.stack(samples).to(self.device)

    def stage2_noise(self, seed: int, num_voxels: int) -> torch.Tensor:
        """(num_voxels, C) float32 stage-2 noise of one sample: its seed's stream, after the stage-1 noise."""
        generator = torch.Generator().manual_seed(seed)
        torch.randn(self._stage1_noise_shape(), generator=generator)  # stage 1 drew these
        return torch.randn(num_voxels, self.models[SLAT_FLOW].in_channels, generator=generator)

    def _check_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim or cond.shape[0] == 0:
            raise ValueError(f"cond must be (B, N, {self.cond_dim}) with B >= 1, got {tuple(cond.shape)}")
        return cond.to(self.device, torch.float32)

    def _neg_cond(self, cond: torch.Tensor) -> torch.Tensor | None:
        """The negative condition for a checked cond (B, N, D): None (zeros) or the pipeline's, expanded to B."""
        return None if self.neg_cond is None else self.neg_cond.expand_as(cond)

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
            neg_cond=self._neg_cond(cond),
            steps=steps,
            cfg_strength=cfg_strength,
            cfg_interval=cfg_interval,
            rescale_t=rescale_t,
        )  # (B, 8, 16, 16, 16)
        logits = self.models[SPARSE_STRUCTURE_DECODER](latent)  # (B, 1, 64, 64, 64)
        structure = SparseStructure(logits=logits[:, 0].float(), seeds=seeds)
        logger.info("stage 1: occupied voxels per sample %s", structure.num_voxels())
        return structure

    def _finish(self, mesh: trimesh.Trimesh, label: str, what: str, allow_empty: bool) -> trimesh.Trimesh:
        """Drop cavity walls and specks; an empty mesh raises EmptyStructureError unless allow_empty."""
        if len(mesh.faces) == 0 and not allow_empty:
            raise EmptyStructureError(
                f"{label} {what}; try another seed or condition, or pass allow_empty=True to get an empty mesh"
            )
        return remove_hidden_components(mesh, self.min_component_faces)

    def coarse_meshes(self, structure: SparseStructure, allow_empty: bool = False) -> list[trimesh.Trimesh]:
        """One watertight mesh per sample: the outer surface of what its occupancy shell encloses, decimated within
        half a voxel (the grid carries no finer detail); an empty grid raises unless allow_empty."""
        meshes = []
        for index, (logits, seed) in enumerate(zip(structure.logits, structure.seeds)):
            mesh = occupancy_mesh(fill_enclosed(logits))
            if len(mesh.faces):
                mesh = simplify(mesh, tolerance=COARSE_TOLERANCE_VOXELS / logits.shape[0])
            meshes.append(
                self._finish(mesh, f"sample {index} (seed {seed})", "decoded to an empty occupancy grid", allow_empty)
            )
        return meshes

    def _require_stage2(self) -> None:
        if not self.has_stage2:
            raise ValueError(
                f"stage 'full' needs the stage-2 models {', '.join(n for n in STAGE2_MODELS if n not in self.models)}, "
                "which are not loaded "
                f"(pipeline.json lists {sorted(self.pipeline.models)}; from_pretrained(stages='coarse') skips them); "
                "use stage='coarse'"
            )

    def _stage2_params(self, params: dict | None) -> dict:
        unknown = sorted(set(params or {}) - set(SAMPLER_PARAMS))
        if unknown:
            raise ValueError(f"unknown slat_sampler_params {unknown}; use {', '.join(SAMPLER_PARAMS)}")
        return dict(params or {})

    @torch.no_grad()
    def sample_structured_latent(
        self, cond: torch.Tensor, voxels: list[torch.Tensor], seeds: list[int], params: dict | None = None
    ) -> sp.SparseTensor:
        """Stage-2 flow: cond (B, N, D) and per-sample voxels (N_i, 3) -> un-normalised latent on (sum N_i, 4)
        coords."""
        coords = torch.cat([F.pad(v.int(), (1, 0), value=index) for index, v in enumerate(voxels)])  # (M, 4)
        noise = torch.cat([self.stage2_noise(seed, v.shape[0]) for seed, v in zip(seeds, voxels)])
        cond = self._check_cond(cond)
        return sample_structured_latent(
            self.models[SLAT_FLOW],
            self.slat_sampler,
            coords,
            cond,
            self.pipeline.slat_normalization,
            noise=noise,
            neg_cond=self._neg_cond(cond),
            **self._stage2_params(params),
        )

    def stage2_occupancy(self, structure: SparseStructure) -> torch.Tensor:
        """(B, r, r, r) bool: the voxels stage 2 runs on, the structure max-pooled to the stage-2 grid."""
        factor = self.structure_resolution // self.stage2_resolution
        if factor == 1:
            return structure.occupancy
        return F.max_pool3d(structure.occupancy[:, None].float(), factor)[:, 0] > 0

    def full_meshes(
        self,
        cond: torch.Tensor,
        structure: SparseStructure,
        allow_empty: bool = False,
        slat_sampler_params: dict | None = None,
    ) -> list[trimesh.Trimesh]:
        """Stage 2 on a stage-1 result: one coloured mesh per sample, in passes of at most max_stage2_voxels voxels."""
        self._require_stage2()
        cond = self._check_cond(cond)
        params = self._stage2_params(slat_sampler_params)
        labels = [f"sample {index} (seed {seed})" for index, seed in enumerate(structure.seeds)]
        meshes = [empty_mesh() for _ in labels]
        voxels = {}
        factor = self.structure_resolution // self.stage2_resolution
        occupancies = (
            F.max_pool3d(structure.occupancy[:, None].float(), factor)[:, 0] > 0 if factor > 1 else structure.occupancy
        )
        for index, occupancy in enumerate(occupancies):
            if not occupancy.any():
                self._finish(meshes[index], labels[index], "decoded to an empty occupancy grid", allow_empty)
                continue
            voxels[index] = stage2_voxels(occupancy, self.max_stage2_voxels, labels[index])
        for group in voxel_budget_groups({index: v.shape[0] for index, v in voxels.items()}, self.max_stage2_voxels):
            raise_if_cancelled()
            start = time.perf_counter()
            latent = self.sample_structured_latent(
                cond[group], [voxels[i] for i in group], [structure.seeds[i] for i in group], params
            )
            decoded = self.models[SLAT_DECODER_MESH].decode(latent)
            for index, mesh in zip(group, decoded):
                meshes[index] = self._finish(
                    mesh, labels[index], f"gave no surface from its {voxels[index].shape[0]} voxels", allow_empty
                )
            logger.info(
                "stage 2: samples %s, voxels %s, %.2f s",
                group,
                [voxels[i].shape[0] for i in group],
                time.perf_counter() - start,
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
        stage: str | None = None,
        allow_empty: bool = False,
        slat_sampler_params: dict | None = None,
    ) -> list[trimesh.Trimesh]:
        """cond (B, N, D) -> B meshes in [-0.5, 0.5]^3.

        stage "coarse" meshes the stage-1 occupancy; "full" adds stage 2 (coloured meshes); None picks
        `default_stage`. steps / cfg_strength / cfg_interval / rescale_t override stage 1's sampler,
        `slat_sampler_params` (same keys) stage 2's; None keeps pipeline.json's. An empty structure
        raises EmptyStructureError naming the sample and seed, or gives an empty mesh with allow_empty.
        """
        stage = stage or self.default_stage
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if stage == "full":
            self._require_stage2()
        structure = self.sample_sparse_structure(cond, seed, steps, cfg_strength, cfg_interval, rescale_t)
        if stage == "coarse":
            return self.coarse_meshes(structure, allow_empty)
        return self.full_meshes(cond, structure, allow_empty, slat_sampler_params)

    def generate_bytes(
        self, cond: torch.Tensor, file_format: str = "glb", target_faces: int | None = DEFAULT_TARGET_FACES, **kwargs
    ) -> list[bytes]:
        """`generate`, then each mesh as GLB / OBJ / PLY bytes, simplified to about target_faces (None: all faces)."""
        return [export_mesh(mesh, file_format, target_faces) for mesh in self.generate(cond, **kwargs)]
