"""Build TRELLIS modules from ckpts/<stem>.json and load ckpts/<stem>.safetensors strictly; write that layout.

A model class is registered here by its TRELLIS class name. It must expose `config_class`, a dataclass
whose fields are the JSON `args`, and take an instance of it as its only constructor argument.
"""

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gap3d.checkpoints import resolve
from gap3d.trellis.config import PipelineConfig

logger = logging.getLogger(__name__)

# TRELLIS class name -> module that defines it (imported on first use, so stage 2 may land later).
MODEL_MODULES = {
    "SparseStructureFlowModel": "gap3d.trellis.sparse_structure_flow",
    "SparseStructureDecoder": "gap3d.trellis.sparse_structure_decoder",
    "SparseStructureEncoder": "gap3d.trellis.sparse_structure_encoder",
    "SLatFlowModel": "gap3d.trellis.structured_latent_flow",
    "SLatMeshDecoder": "gap3d.trellis.structured_latent_decoder",
    "SLatEncoder": "gap3d.trellis.structured_latent_encoder",
}


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes differ from the module built from its JSON."""


def model_class(name: str) -> type[nn.Module]:
    """The nn.Module class registered under TRELLIS class name `name`."""
    if name not in MODEL_MODULES:
        raise ValueError(f"unknown TRELLIS model class {name!r}; known: {', '.join(sorted(MODEL_MODULES))}")
    try:
        module = importlib.import_module(MODEL_MODULES[name])
    except ModuleNotFoundError as err:
        raise NotImplementedError(
            f"TRELLIS model class {name} ({MODEL_MODULES[name]}) is not available in this build"
        ) from err
    return getattr(module, name)


def build_model(spec: dict, where: str = "model spec", device: torch.device | str = "cpu") -> nn.Module:
    """A module from {"name": class name, "args": {...}}, built on `device` ("meta" allocates nothing)."""
    if "name" not in spec:
        raise ValueError(f"{where}: expected {{'name': ..., 'args': {{...}}}}, got keys {sorted(spec)}")
    cls = model_class(spec["name"])
    try:
        config = cls.config_class(**spec.get("args", {}))
    except TypeError as err:
        raise ValueError(f"{where}: bad args for {spec['name']}: {err}") from err
    with torch.device(device):
        return cls(config)


def state_dict_mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between `model`'s state dict and `state`: missing, unexpected, shape."""
    expected = model.state_dict()
    problems = [f"missing key {key} (shape {tuple(expected[key].shape)})" for key in expected if key not in state]
    problems += [f"unexpected key {key} (shape {tuple(state[key].shape)})" for key in state if key not in expected]
    problems += [
        f"shape conflict at {key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    return problems


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`, raising CheckpointMismatchError that lists every mismatch."""
    problems = state_dict_mismatches(model, state)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointMismatchError(f"{where} does not match its architecture JSON:\n  {shown}")
    model.load_state_dict(state, strict=True)


def load_model(root: Path, stem: str, device: torch.device | str = "cpu") -> nn.Module:
    """Build `root`/`stem`.json and load `root`/`stem`.safetensors into it, strictly, in eval mode."""
    json_path, weights_path = Path(root) / f"{stem}.json", Path(root) / f"{stem}.safetensors"
    for path in (json_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"TRELLIS checkpoint at {root} is missing {path.relative_to(root)}")
    model = build_model(json.loads(json_path.read_text()), str(json_path), device="meta")
    model.to_empty(device=device)  # every tensor is then overwritten by the strict load
    load_state_dict_strict(model, load_file(str(weights_path), device=str(device)), str(weights_path))
    logger.info(
        "loaded %s (%s, %.1fM parameters)", stem, type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6
    )
    return model.eval().requires_grad_(False)


def load_pipeline(
    uri: str, names: tuple[str, ...], device: torch.device | str = "cpu", optional: tuple[str, ...] = ()
) -> tuple[PipelineConfig, dict[str, nn.Module]]:
    """pipeline.json and the models `names` of a TRELLIS checkpoint directory or s3:// URI, plus the
    models `optional` when pipeline.json lists all of them."""
    root = resolve(uri)
    pipeline = PipelineConfig.load(root)
    unknown = [name for name in names if name not in pipeline.models]
    if unknown:
        raise ValueError(f"{uri}/pipeline.json lists no model {', '.join(unknown)} (has {sorted(pipeline.models)})")
    if all(name in pipeline.models for name in optional):
        names = (*names, *optional)
    return pipeline, {name: load_model(root, pipeline.models[name], device) for name in names}


@dataclass
class ModelSpec:
    stem: str  # checkpoint stem under the root, e.g. "ckpts/ss_flow_tiny"
    class_name: str  # TRELLIS class name, a key of loading.MODEL_MODULES
    args: dict = field(default_factory=dict)  # constructor args, the JSON "args"


def write_trellis_checkpoint(
    out_dir: str | Path,
    specs: dict[str, ModelSpec],
    models: dict[str, nn.Module],
    pipeline: PipelineConfig,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write pipeline.json and, per model, <stem>.json + <stem>.safetensors under `out_dir` (floating-point tensors in
    `dtype` when given; loading casts them to the model's)."""
    root = Path(out_dir)
    for name, spec in specs.items():
        stem_path = root / spec.stem
        stem_path.parent.mkdir(parents=True, exist_ok=True)
        stem_path.with_suffix(".json").write_text(json.dumps({"name": spec.class_name, "args": spec.args}, indent=2))
        state = {
            key: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
            .detach()
            .contiguous()
            .cpu()
            for key, tensor in models[name].state_dict().items()
        }
        save_file(state, str(stem_path.with_suffix(".safetensors")))
    pipeline.save(root)
    return root
