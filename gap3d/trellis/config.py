"""pipeline.json of a TRELLIS image-to-3D release, parsed and checked.

Layout (TRELLIS-image-large): {"name": "TrellisImageTo3DPipeline", "args": {"models": {name: "ckpts/<stem>"},
"sparse_structure_sampler": {"name", "args": {"sigma_min"}, "params": {"steps", "cfg_strength",
"cfg_interval", "rescale_t"}}, "slat_sampler": {...}, "slat_normalization": {"mean", "std"},
"image_cond_model": ...}}. Each ckpts/<stem>.json holds {"name": class name, "args": {...}}. A text-to-3D release
(TrellisTextTo3DPipeline) names its text encoder in "text_cond_model" instead; it guides with the encoded empty
caption, not zeros, so it decodes only given that negative condition. Arguments the port does not know are refused
by name: it would not compute them as TRELLIS does.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

# Sampler classes of TRELLIS we reproduce: plain Euler, Euler + CFG, Euler + CFG inside a time interval.
SAMPLER_NAMES = ("FlowEulerSampler", "FlowEulerCfgSampler", "FlowEulerGuidanceIntervalSampler")
IMAGE_PIPELINE, TEXT_PIPELINE = "TrellisImageTo3DPipeline", "TrellisTextTo3DPipeline"
# pipeline.json args the port reads; any other is refused by name.
PIPELINE_ARGS = (
    "models",
    "sparse_structure_sampler",
    "slat_sampler",
    "slat_normalization",
    "image_cond_model",
    "text_cond_model",
)

SPARSE_STRUCTURE_FLOW = "sparse_structure_flow_model"
SPARSE_STRUCTURE_DECODER = "sparse_structure_decoder"
STAGE1_MODELS = (SPARSE_STRUCTURE_FLOW, SPARSE_STRUCTURE_DECODER)
SLAT_FLOW = "slat_flow_model"
SLAT_DECODER_MESH = "slat_decoder_mesh"
STAGE2_MODELS = (SLAT_FLOW, SLAT_DECODER_MESH)


@dataclass
class SamplerConfig:
    name: str = "FlowEulerGuidanceIntervalSampler"  # one of SAMPLER_NAMES
    sigma_min: float = 1e-5  # TRELLIS's noise floor; enters only its x0 estimate, not the Euler update
    steps: int = 50  # Euler steps from t=1 (noise) to t=0 (data)
    cfg_strength: float = 3.0  # guidance s: v = (1 + s) v(cond) - s v(zeros)
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only while lo <= t <= hi (t in [0, 1])
    rescale_t: float = 1.0  # time warp t' = r t / (1 + (r - 1) t); r > 1 spends more steps near t=1

    def __post_init__(self):
        if self.name not in SAMPLER_NAMES:
            raise ValueError(f"sampler name {self.name!r} is not supported; use one of {', '.join(SAMPLER_NAMES)}")
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.rescale_t <= 0:
            raise ValueError(f"sampler rescale_t must be positive, got {self.rescale_t}")
        if self.cfg_strength < 0:
            raise ValueError(f"sampler cfg_strength must be >= 0, got {self.cfg_strength}")
        low, high = (float(v) for v in self.cfg_interval)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"sampler cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        self.cfg_interval = (low, high)
        if self.name == "FlowEulerSampler":
            self.cfg_strength = 0.0
        elif self.name == "FlowEulerCfgSampler":
            self.cfg_interval = (0.0, 1.0)

    @classmethod
    def from_json(cls, entry: dict, where: str) -> "SamplerConfig":
        """Build from a pipeline.json sampler entry {"name", "args", "params"}."""
        try:
            return cls(name=entry["name"], **entry.get("args", {}), **entry.get("params", {}))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: bad sampler entry {entry!r}: {err}") from err

    def to_json(self) -> dict:
        params = {
            "steps": self.steps,
            "cfg_strength": self.cfg_strength,
            "cfg_interval": list(self.cfg_interval),
            "rescale_t": self.rescale_t,
        }
        return {"name": self.name, "args": {"sigma_min": self.sigma_min}, "params": params}


@dataclass
class PipelineConfig:
    models: dict[str, str]  # model name -> checkpoint stem relative to the root, e.g. "ckpts/ss_dec_conv3d_16l8_fp16"
    sparse_structure_sampler: SamplerConfig = field(default_factory=SamplerConfig)  # stage-1 sampler
    slat_sampler: SamplerConfig = field(default_factory=SamplerConfig)  # stage-2 sampler
    slat_normalization: dict[str, list[float]] | None = None  # stage-2 latent {"mean": [...], "std": [...]}
    name: str = IMAGE_PIPELINE  # TRELLIS pipeline class: image- or text-conditioned
    image_cond_model: str | None = None  # the image release's DINOv2 (its tokens are the condition); informational
    text_cond_model: str | None = None  # the text release's CLIP text encoder, a hub name (gap3d.text_conditioning)

    def __post_init__(self):
        if self.name not in (IMAGE_PIPELINE, TEXT_PIPELINE):
            raise ValueError(
                f"pipeline.json name {self.name!r} is not supported; use {IMAGE_PIPELINE} or {TEXT_PIPELINE}"
            )
        if (self.name == TEXT_PIPELINE) != (self.text_cond_model is not None):
            raise ValueError(
                f"pipeline.json: text_cond_model is given exactly for {TEXT_PIPELINE}, got name {self.name!r}"
            )
        missing = [name for name in STAGE1_MODELS if name not in self.models]
        if missing:
            raise ValueError(
                f"pipeline.json lists no {', '.join(missing)} under args.models (has {sorted(self.models)})"
            )
        if self.slat_normalization is not None:
            for key in ("mean", "std"):
                if not isinstance(self.slat_normalization.get(key), list):
                    raise ValueError(
                        f"pipeline.json slat_normalization needs a list under {key!r}, got {self.slat_normalization!r}"
                    )

    @property
    def has_stage2(self) -> bool:
        """Whether the structured-latent flow and mesh decoder are listed (stage "full" is possible)."""
        return all(name in self.models for name in STAGE2_MODELS)

    @classmethod
    def load(cls, root: Path) -> "PipelineConfig":
        """Read and check `root`/pipeline.json."""
        path = Path(root) / "pipeline.json"
        if not path.is_file():
            raise FileNotFoundError(f"TRELLIS checkpoint at {root} has no pipeline.json")
        spec = json.loads(path.read_text())
        args = spec.get("args")
        if not isinstance(args, dict) or not isinstance(args.get("models"), dict):
            raise ValueError(f"{path}: expected {{'args': {{'models': {{...}}, ...}}}}")
        unknown = sorted(set(args) - set(PIPELINE_ARGS))
        if unknown:
            raise ValueError(
                f"{path}: args {', '.join(unknown)} are not computed by this port of TRELLIS; it reads "
                f"{', '.join(PIPELINE_ARGS)}"
            )
        samplers = {
            key: SamplerConfig.from_json(args[key], f"{path} args.{key}")
            for key in ("sparse_structure_sampler", "slat_sampler")
            if key in args
        }
        return cls(
            models=dict(args["models"]),
            slat_normalization=args.get("slat_normalization"),
            name=spec.get("name", IMAGE_PIPELINE),
            image_cond_model=args.get("image_cond_model"),
            text_cond_model=args.get("text_cond_model"),
            **samplers,
        )

    def save(self, root: Path) -> None:
        """Write `root`/pipeline.json."""
        (Path(root) / "pipeline.json").write_text(json.dumps(self.to_json(), indent=2))

    def to_json(self) -> dict:
        args = {
            "models": dict(self.models),
            "sparse_structure_sampler": self.sparse_structure_sampler.to_json(),
            "slat_sampler": self.slat_sampler.to_json(),
        }
        if self.slat_normalization is not None:
            args["slat_normalization"] = self.slat_normalization
        for key in ("image_cond_model", "text_cond_model"):
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        return {"name": self.name, "args": args}


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
# ckpts/ss_enc_conv3d_16l8_fp16.json: the VAE encoder the release's stage-1 flow latents came from.
OFFICIAL_SPARSE_STRUCTURE_ENCODER_ARGS = {
    "in_channels": 1,
    "latent_channels": 8,
    "num_res_blocks": 2,
    "num_res_blocks_middle": 2,
    "channels": [32, 128, 512],
    "use_fp16": True,
}
# The release's stage-2 architectures (ckpts/slat_flow_img_dit_L_64l8p2_fp16.json,
# slat_dec_mesh_swin8_B_64l8m256c_fp16.json).
OFFICIAL_SLAT_FLOW_ARGS = {
    **OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
    "resolution": 64,
    "patch_size": 2,
    "num_io_res_blocks": 2,
    "io_block_channels": [128],
}
OFFICIAL_SLAT_MESH_DECODER_ARGS = {
    "resolution": 64,
    "model_channels": 768,
    "latent_channels": 8,
    "num_blocks": 12,
    "num_heads": 12,
    "mlp_ratio": 4,
    "attn_mode": "swin",
    "window_size": 8,
    "use_fp16": True,
    "representation_config": {"use_color": True},
}
# Sampler settings of the release's pipeline.json.
OFFICIAL_SPARSE_STRUCTURE_SAMPLER = SamplerConfig(steps=25, cfg_strength=7.5, cfg_interval=(0.5, 1.0), rescale_t=3.0)
OFFICIAL_SLAT_SAMPLER = SamplerConfig(steps=25, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
