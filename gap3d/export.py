"""Inference export: what serving loads from a training checkpoint, in plain PyTorch.

An export directory holds
    model.safetensors   "aligner.<name>" = EMA aligner weights; "soft_tokens" (s, d_vlm) = EMA soft tokens,
                        present only when the soft tokens trained (otherwise the prompt encoder's seeded
                        initial tokens, vlm.init_seed, are the ones training used)
    config.yaml         the resolved Gap3DConfig of the run
    export.json         {"format", "version", "step", "has_soft_tokens"}
Training writes one into every checkpoint as `export/`.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gap3d.aligner import AlignerDiT
from gap3d.checkpoints import require_files, resolve
from gap3d.config import Gap3DConfig, load_config, save_config
from gap3d.prompt_encoder import PromptEncoder

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "gap3d-aligner-export"
EXPORT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
META_NAME = "export.json"
EXPORT_DIR = "export"  # sub-directory of a training checkpoint


@dataclass
class AlignerExport:
    """A loaded export: the run's config and soft tokens, and (when asked for) the ready-to-sample aligner."""

    config: Gap3DConfig
    step: int  # optimiser steps the weights were trained for
    soft_tokens: torch.Tensor | None  # (s, d_vlm), None when the soft tokens did not train
    aligner: AlignerDiT | None = None  # eval mode, EMA weights; None from load_export(with_aligner=False)


def save_export(
    directory: str | Path,
    aligner_state: dict[str, torch.Tensor],
    soft_tokens: torch.Tensor | None,
    config: Gap3DConfig,
    step: int,
) -> Path:
    """Write an export directory from an aligner state dict and optional soft tokens (s, d_vlm)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"aligner.{name}": value.detach().float().cpu().contiguous() for name, value in aligner_state.items()}
    if soft_tokens is not None:
        tensors["soft_tokens"] = soft_tokens.detach().float().cpu().contiguous()
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": EXPORT_FORMAT, "step": str(step)})
    save_config(config, directory / CONFIG_NAME)
    meta = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "step": step,
        "has_soft_tokens": soft_tokens is not None,
    }
    (directory / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def find_export_dir(uri: str) -> Path:
    """Local directory of the export at `uri`: an export directory itself or a training checkpoint holding `export/`."""
    root = resolve(uri)
    if (root / META_NAME).is_file():
        return root
    if (root / EXPORT_DIR / META_NAME).is_file():
        return root / EXPORT_DIR
    raise FileNotFoundError(
        f"{uri} is neither an aligner export (no {META_NAME}) nor a training checkpoint (no {EXPORT_DIR}/{META_NAME})"
    )


def load_export(uri: str, device: str | torch.device = "cpu", with_aligner: bool = True) -> AlignerExport:
    """Load an export (local path or s3:// URI, export dir or checkpoint dir) in plain PyTorch.

    The aligner is built on the meta device and takes the stored tensors as they are (`assign=True`), so no
    weights are initialised only to be overwritten; `with_aligner=False` skips it (for stages that never run it).
    """
    directory = find_export_dir(uri)
    require_files(directory, [WEIGHTS_NAME, CONFIG_NAME, META_NAME], what="aligner export")
    meta = json.loads((directory / META_NAME).read_text())
    if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
        raise ValueError(
            f"{directory / META_NAME} is format {meta.get('format')!r} v{meta.get('version')}; this code reads "
            f"{EXPORT_FORMAT!r} v{EXPORT_VERSION}"
        )
    config = load_config(yaml_path=directory / CONFIG_NAME)
    with safe_open(directory / WEIGHTS_NAME, framework="pt", device=str(device)) as weights:
        soft_tokens = weights.get_tensor("soft_tokens") if "soft_tokens" in weights.keys() else None
        aligner_state = {
            name[len("aligner.") :]: weights.get_tensor(name)
            for name in weights.keys()
            if with_aligner and name.startswith("aligner.")
        }
    export = AlignerExport(config=config, step=int(meta["step"]), soft_tokens=soft_tokens)
    if with_aligner:
        with torch.device("meta"):
            aligner = AlignerDiT(config.aligner)
        aligner.load_state_dict(aligner_state, strict=True, assign=True)
        aligner.init_buffers(device)
        export.aligner = aligner.eval()
    return export


def apply_soft_tokens(prompt_encoder: PromptEncoder, soft_tokens: torch.Tensor | None) -> None:
    """Put exported soft tokens (s, d_vlm) into a prompt encoder; None keeps its seeded initial tokens."""
    if soft_tokens is None:
        return
    if soft_tokens.shape != prompt_encoder.soft_tokens.shape:
        raise ValueError(
            f"exported soft tokens are {tuple(soft_tokens.shape)} but the prompt encoder has "
            f"{tuple(prompt_encoder.soft_tokens.shape)}"
        )
    with torch.no_grad():
        prompt_encoder.soft_tokens.copy_(soft_tokens)
