"""Held-out evaluation of an aligner, the same for the training job's periodic evals, ray_jobs/evaluate.py and
the demo: sample tokens from each row's condition and score them against the row's true DINOv2 tokens
(gap3d.metrics), with attribute accuracy where the captions name attributes of a given vocabulary (such as
the synthetic world's shapes and colours, which its shards list in synth.json).
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gap3d import storage
from gap3d.aligner import AlignerDiT
from gap3d.config import FlowConfig, Gap3DConfig
from gap3d.features.format import FeatureBatch
from gap3d.features.store import load_rows
from gap3d.flow import sample
from gap3d.metrics import AttributeProbe, alignment_metrics
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import batch_condition

PROBE_ROWS = 512  # training rows the attribute probe is fit on


@dataclass
class EvalSet:
    """Held-out rows, what their captions say, and a probe fit on true training targets."""

    batch: FeatureBatch  # held-out feature rows
    captions: list[str]
    keys: list[str]  # the rows' sample keys
    labels: dict[str, list[str]] | None  # attribute -> value per row; None when the captions do not name them
    probe: AttributeProbe | None  # linear classifier per attribute, fit on true training targets


Vocabulary = Mapping[str, Sequence[str]]  # attribute -> its values, each a word a caption may name


def caption_labels(captions: Sequence[str], vocabulary: Vocabulary) -> dict[str, list[str]] | None:
    """{attribute: value per caption} when every caption names exactly one value of every attribute (as whole
    words, case-insensitive), else None."""
    words = {value.lower(): name for name, values in vocabulary.items() for value in values}
    labels: dict[str, list[str]] = {name: [] for name in vocabulary}
    for caption in captions:
        found: dict[str, set[str]] = {name: set() for name in vocabulary}
        for word in re.findall(r"[a-z]+", caption.lower()):
            if word in words:
                found[words[word]].add(word)
        if any(len(values) != 1 for values in found.values()):
            return None
        for name, values in found.items():
            labels[name].append(values.pop())
    return labels


def read_vocabulary(uri: str) -> dict[str, list[str]]:
    """The `attributes` mapping ({attribute: [values]}) of a JSON file such as the synthetic world's synth.json."""
    fs, path = storage.filesystem(uri)
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"no attribute vocabulary at {uri}: give a JSON file with an `attributes` mapping (the synthetic world's "
            "synth.json)"
        )
    vocabulary = json.loads(fs.cat_file(path)).get("attributes")
    if not isinstance(vocabulary, dict) or not all(
        isinstance(values, list) and values for values in vocabulary.values()
    ):
        raise ValueError(f"{uri} needs `attributes`: a mapping of each attribute to a non-empty list of its values")
    return vocabulary


def load_eval_set(
    eval_features: str,
    config: Gap3DConfig,
    limit: int | None = None,
    train_features: str | None = None,
    vocabulary: Vocabulary | None = None,
) -> EvalSet:
    """Up to `limit` held-out rows of `eval_features`; with `train_features` (same encoders) and a `vocabulary` the
    captions name, an attribute probe fit on the training targets."""
    batch, captions, keys = load_rows(eval_features, config, limit=limit)
    labels = caption_labels(captions, vocabulary) if vocabulary else None
    probe = None
    if labels is not None and train_features is not None:
        train_batch, train_captions, _ = load_rows(train_features, config, limit=PROBE_ROWS)
        train_labels = caption_labels(train_captions, vocabulary)
        probe = AttributeProbe(train_batch.dino, train_labels) if train_labels is not None else None
    return EvalSet(batch, captions, keys, labels, probe)


@torch.no_grad()
def evaluation_condition(
    batch: FeatureBatch, prompt_encoder: PromptEncoder | None, device: torch.device, chunk: int = 32
) -> torch.Tensor:
    """`batch_condition` without gradients, on `device`, `chunk` rows at a time -> (B, s, d_vlm) float32."""
    dtype = prompt_encoder.soft_tokens.dtype if prompt_encoder is not None else torch.float32
    moved = batch.to(device, dtype)
    parts = [
        batch_condition(
            FeatureBatch(
                moved.dino[i : i + chunk],
                None if moved.caches is None else moved.caches[i : i + chunk],
                None if moved.latents is None else moved.latents[i : i + chunk],
            ),
            prompt_encoder,
        )
        for i in range(0, len(moved), chunk)
    ]
    return torch.cat(parts).float()


@torch.no_grad()
def generate_tokens(
    aligner: AlignerDiT, cond: torch.Tensor, flow_config: FlowConfig, seed: int, batch_size: int = 32
) -> torch.Tensor:
    """Sample DINOv2-space tokens for conditions (B, s, d_vlm) -> (B, N, D), in chunks, noise fixed by `seed`."""
    shape = (aligner.config.num_tokens, aligner.config.token_dim)
    generator = torch.Generator(device=cond.device).manual_seed(seed)
    chunks = [
        sample(aligner, part, shape, flow_config.sample_steps, flow_config.cfg_scale, flow_config.solver, generator)
        for part in cond.split(batch_size)
    ]
    return torch.cat(chunks)


def evaluate_alignment(
    aligner: AlignerDiT, cond: torch.Tensor, eval_set: EvalSet, flow_config: FlowConfig, seed: int = 0
) -> dict[str, float]:
    """gap3d.metrics.alignment_metrics of samples for cond (B, s, d) against the eval set's targets (B, N, D)."""
    was_training = aligner.training
    aligner.eval()
    generated = generate_tokens(aligner, cond, flow_config, seed)
    aligner.train(was_training)
    return alignment_metrics(generated.cpu(), eval_set.batch.dino, eval_set.probe, eval_set.labels)
