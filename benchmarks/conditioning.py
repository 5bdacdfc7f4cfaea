"""Why does conditioning learn slowly? Train the tiny world for a fixed number of steps per variant of the
conditioning path and print one JSON line each: held-out recall@5 (on centred embeddings, chance 5 / rows),
prompt-specific cosine and attribute accuracies, pooled and per shape and colour. Two lines come first: the
variance of the training targets that the captions' attributes explain, and the caption ceiling (each held-out row
predicted by the mean target of its attribute combination: the best a generator that reads only the caption can do).

    python benchmarks/conditioning.py [--steps 600] [--num 800] [--variants aligner,oracle,...] [key.sub=value ...]

Every variant trains in this process (miniature.experiment) on features encoded once by the production
FeatureEncoder, and is scored on the held-out shape x colour pairs. Variants change one thing of the tiny
preset: `aligner` (as configured), `oracle` (the attributes one-hot as the condition, no VLM), `gate_closed`
(cross-attention gates start at 0, as the authors'), `rope_only` (no absolute position embedding, as the
authors'), `no_pool` (no pooled condition in adaLN), `lr_low`/`lr_high` (train.lr / 3, x 3), `soft_16` (16 soft
tokens), `frozen_soft` (soft tokens kept at their initial values), `soft_lr_full` (soft tokens at train.lr, as the
authors train them), `random_vlm` (tiny://vlm's random weights, before it learns the world's language), and
`cfg_1`/`cfg_4` (the `aligner` model sampled at those guidance scales). Training and
sampling are seeded, so quality figures repeat exactly across runs on one machine; `train_seconds` does not.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from gap3d.build import derive_shapes
from gap3d.config import Gap3DConfig, load_config
from gap3d.evaluation import generate_tokens
from gap3d.metrics import alignment_metrics
from miniature.checkpoints.encoders import write_tiny_vlm
from miniature.experiment import (
    World,
    caption_ceiling,
    encode_world,
    held_out_condition,
    train_in_process,
)

VARIANTS = (
    "aligner",
    "oracle",
    "gate_closed",
    "rope_only",
    "no_pool",
    "lr_low",
    "lr_high",
    "soft_16",
    "frozen_soft",
    "soft_lr_full",
    "random_vlm",
    "cfg_1",
    "cfg_4",
)
KEEP = ("centred_recall@5", "recall@5", "prompt_cosine_mean", "shape_accuracy", "color_accuracy", "cosine_mean")


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in values.items()}


def emit(**figure) -> None:
    sys.stdout.write(json.dumps(figure) + "\n")
    sys.stdout.flush()


def variant_config(config: Gap3DConfig, name: str, scratch: str) -> Gap3DConfig:
    """The config a variant trains with: the tiny preset with one thing changed (a random VLM is written under
    `scratch`)."""
    replace = dataclasses.replace
    changes = {
        "gate_closed": {"aligner": {"cross_gate_init": 0.0}},
        "rope_only": {"aligner": {"absolute_positions": False}},
        "no_pool": {"aligner": {"pooled_condition": False}},
        "lr_low": {"train": {"lr": config.train.lr / 3, "min_lr": config.train.min_lr / 3}},
        "lr_high": {"train": {"lr": config.train.lr * 3, "min_lr": config.train.min_lr * 3}},
        "soft_16": {"vlm": {"num_soft_tokens": 16}, "aligner": {"num_cond_tokens": None}},
        "frozen_soft": {"vlm": {"trainable": False}},
        "soft_lr_full": {"train": {"soft_token_lr_scale": 1.0}},
    }.get(name, {})
    if name == "random_vlm":
        changes = {"vlm": {"path": str(write_tiny_vlm(Path(scratch) / "random-vlm"))}}
    return derive_shapes(
        replace(config, **{section: replace(getattr(config, section), **fields) for section, fields in changes.items()})
    )


def variance_explained(world: World) -> dict:
    """Share of the training targets' variance explained by their caption's attributes (between-class variance)."""
    flat = world.train.batch.dino.double().flatten(1)
    total = (flat - flat.mean(0)).pow(2).sum(1).mean()
    labels = world.train.labels
    keys = {"shape_x_color": [f"{s}/{c}" for s, c in zip(labels["shape"], labels["color"])], **labels}
    result = {}
    for name, values in keys.items():
        values = np.array(values)
        between = sum(
            (values == v).sum() * (flat[values == v].mean(0) - flat.mean(0)).pow(2).sum() for v in set(values)
        )
        result[name] = round((between / len(values) / total).item(), 3)
    return result


def score_variant(name: str, config: Gap3DConfig, world: World, trained: dict, args, scratch: str) -> dict:
    """Train variant `name` (once per base variant) and score its tokens for the held-out captions."""
    base = "aligner" if name.startswith("cfg_") else name
    if base not in trained:
        variant = variant_config(config, base, scratch)
        encoded = world if variant.vlm == config.vlm else encode_world(variant, args.num, args.seed)
        trained[base] = (
            variant,
            encoded,
            train_in_process(variant, encoded.train, args.steps, oracle=base == "oracle"),
        )
    variant, encoded, result = trained[base]
    flow = dataclasses.replace(variant.flow, cfg_scale={"cfg_1": 1.0, "cfg_4": 4.0}.get(name, variant.flow.cfg_scale))
    eval_set = encoded.eval_set()
    cond = held_out_condition(variant, encoded, result, oracle=base == "oracle")
    tokens = generate_tokens(result.aligner.eval(), cond, flow, seed=variant.train.seed)
    metrics = alignment_metrics(tokens, eval_set.batch.dino, eval_set.probe, eval_set.labels)
    reports = eval_set.probe.report(tokens, eval_set.labels)
    return {
        "figure": "conditioning_variant",
        "variant": name,
        **{k: round(metrics[k], 4) for k in KEEP},
        # Per class: a pooled accuracy hides an unseen pair that never composes (docs/miniature.md).
        **{f"{attribute}_per_class": rounded(report["per_class"]) for attribute, report in reports.items()},
        "train_seconds": round(result.seconds, 1),
        "cfg_scale": flow.cfg_scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per variant")
    parser.add_argument("--num", type=int, default=800, help="synthetic samples over both splits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides such as train.lr=1e-3")
    args = parser.parse_args()
    config = derive_shapes(
        load_config("tiny", overrides=[f"train.max_steps={args.steps}", *args.overrides])
    )  # the LR schedule spans the run
    world = encode_world(config, args.num, args.seed)
    rows = len(world.eval)
    common = {
        "steps": args.steps,
        "train_rows": len(world.train),
        "eval_rows": rows,
        "recall@5_chance": round(min(1.0, 5 / rows), 4),
    }
    emit(figure="target_variance_explained_by_caption", **variance_explained(world), **common)
    ceiling = caption_ceiling(world)
    emit(figure="caption_ceiling", **{k: round(ceiling[k], 4) for k in KEEP}, **common)
    trained: dict = {}  # variant -> (config, encoded world, training result), shared by the cfg_* variants
    with tempfile.TemporaryDirectory(prefix="gap3d-conditioning-") as scratch:
        for name in args.variants.split(","):
            emit(**score_variant(name, config, world, trained, args, scratch), **common)


if __name__ == "__main__":
    main()
