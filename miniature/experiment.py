"""The synthetic world as an in-memory experiment: encode it once, train the aligner in this process, score it.

benchmarks/conditioning.py and the learning test use it; the jobs (Ray Data, Ray Train) do the same work at
scale. Training here uses the library's pieces (AlignerTrainModule, optimizer groups, the LR schedule, EMA) on
one process, so a variant's result reflects the method and its config, not the distributed wrapping.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from gap3d.aligner import AlignerDiT
from gap3d.build import build_aligner
from gap3d.config import Gap3DConfig
from gap3d.data.encode import FeatureEncoder
from gap3d.evaluation import EvalSet, evaluate_alignment, evaluation_condition
from gap3d.features.format import FeatureBatch, batch_from_rows
from gap3d.flow import FlowConfig
from gap3d.metrics import AttributeProbe, alignment_metrics
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import (
    EMA,
    AlignerTrainModule,
    build_optimizer,
    lr_schedule,
    trainable_parameters,
    with_soft_tokens,
)
from miniature.world import ATTRIBUTES, render_scene, sample_scene

ENCODE_CHUNK = 64  # scenes rendered and encoded at a time


@dataclass
class Split:
    """One split of the world in memory."""

    batch: FeatureBatch  # dino targets (B, N, D) and prompt caches (or soft latents)
    captions: list[str]
    labels: dict[str, list[str]]  # attribute -> value per row

    def __len__(self) -> int:
        return len(self.captions)

    def shuffled_captions(self, seed: int) -> "Split":
        """The same images paired with other rows' captions (and their prompt caches): a world without a prompt
        signal."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        batch = FeatureBatch(
            self.batch.dino,
            None if self.batch.caches is None else [self.batch.caches[i] for i in order],
            None if self.batch.latents is None else self.batch.latents[order],
        )
        return Split(
            batch, [self.captions[i] for i in order], {k: [v[i] for i in order] for k, v in self.labels.items()}
        )


@dataclass
class World:
    train: Split
    eval: Split

    def eval_set(self) -> EvalSet:
        """Held-out rows with an attribute probe fit on the true training targets."""
        probe = AttributeProbe(self.train.batch.dino, self.train.labels)
        keys = [str(i) for i in range(len(self.eval))]
        return EvalSet(self.eval.batch, self.eval.captions, keys, self.eval.labels, probe)


def encode_world(config: Gap3DConfig, num: int, seed: int = 0) -> World:
    """Render and encode `num` synthetic scenes with the production FeatureEncoder, split by held-out pairs."""
    encoder = FeatureEncoder(config)
    scenes = [sample_scene(seed, index) for index in range(num)]
    splits = {}
    for split in ("train", "eval"):
        chosen = [scene for scene in scenes if scene.split == split]
        parts = []
        for start in range(0, len(chosen), ENCODE_CHUNK):
            chunk = chosen[start : start + ENCODE_CHUNK]
            images = np.stack([render_scene(scene, config.dino.image_size) for scene in chunk])
            table = encoder.encode([str(i) for i in range(len(chunk))], [scene.caption for scene in chunk], images)
            parts.append(batch_from_rows(table.to_pydict(), encoder.manifest))
        caches = None if parts[0].caches is None else [c for part in parts for c in part.caches]
        latents = None if parts[0].latents is None else torch.cat([part.latents for part in parts])
        batch = FeatureBatch(torch.cat([part.dino for part in parts]), caches, latents)
        labels = {name: [getattr(scene, name) for scene in chosen] for name in ATTRIBUTES}
        splits[split] = Split(batch, [scene.caption for scene in chosen], labels)
    return World(splits["train"], splits["eval"])


def oracle_condition(labels: dict[str, list[str]], config: Gap3DConfig) -> torch.Tensor:
    """The attributes one-hot (shape, then colour) in the first dims of every condition token: (B, s, d_vlm)."""
    onehot = torch.tensor(
        [
            [float(labels[name][i] == option) for name, options in ATTRIBUTES.items() for option in options]
            for i in range(len(labels["shape"]))
        ]
    )  # (B, number of attribute values)
    cond = torch.zeros(len(onehot), config.vlm.num_soft_tokens, config.aligner.cond_dim)
    cond[:, :, : onehot.shape[1]] = onehot[:, None]
    return cond


@dataclass
class Trained:
    aligner: AlignerDiT  # EMA weights
    prompt_encoder: PromptEncoder | None  # EMA soft tokens on the frozen VLM; None for an oracle condition
    seconds: float  # wall time of the optimiser steps


def train_in_process(config: Gap3DConfig, split: Split, steps: int, oracle: bool = False) -> Trained:
    """Train the aligner (and soft tokens) for `steps` steps of train.global_batch_size rows drawn from `split`."""
    torch.manual_seed(config.train.seed)
    prompt_encoder = None if oracle or not config.vlm.trainable else FeatureEncoder(config).prompt_encoder
    module = AlignerTrainModule(build_aligner(config, seed=config.train.seed), config.flow, prompt_encoder)
    ema = EMA(trainable_parameters(module), config.train.ema_decay)
    optimizer = build_optimizer(module, config.train)
    scheduler = lr_schedule(optimizer, config.train)
    generator = torch.Generator().manual_seed(config.train.seed)
    latents = oracle_condition(split.labels, config) if oracle else split.batch.latents
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randperm(len(split), generator=generator)[: config.train.global_batch_size]
        caches = None if oracle or split.batch.caches is None else [split.batch.caches[i] for i in index.tolist()]
        losses = module(
            FeatureBatch(split.batch.dino[index], caches, None if latents is None else latents[index]), generator
        )
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(module).values(), config.train.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(trainable_parameters(module))
    seconds = time.perf_counter() - start
    aligner = build_aligner(config)
    aligner.load_state_dict(ema.split("aligner"))
    encoder = with_soft_tokens(prompt_encoder, ema.shadow["soft_tokens"]) if prompt_encoder is not None else None
    return Trained(aligner, encoder, seconds)


def held_out_condition(config: Gap3DConfig, world: World, trained: Trained, oracle: bool = False) -> torch.Tensor:
    """Each eval row's condition (B, s, d_vlm): its caption through the trained prompt encoder, or the oracle's."""
    if oracle:
        return oracle_condition(world.eval.labels, config)
    if trained.prompt_encoder is None and world.eval.batch.latents is None:
        raise ValueError("frozen soft tokens need features in soft_latents mode (vlm.trainable=false when encoding)")
    return evaluation_condition(world.eval.batch, trained.prompt_encoder, torch.device("cpu"))


def score(
    config: Gap3DConfig, world: World, trained: Trained, oracle: bool = False, flow: FlowConfig | None = None
) -> dict[str, float]:
    """Held-out metrics (gap3d.metrics.alignment_metrics) of tokens sampled from each eval row's condition."""
    cond = held_out_condition(config, world, trained, oracle)
    return evaluate_alignment(trained.aligner, cond, world.eval_set(), flow or config.flow, seed=config.train.seed)


def caption_ceiling(world: World) -> dict[str, float]:
    """Metrics of the best a caption alone allows: each eval row's prediction is the mean true target of its
    attribute combination, since yaw, elevation and light are not in the caption."""
    combos = list(zip(*world.eval.labels.values()))
    targets = world.eval.batch.dino.float()
    means = {combo: targets[[i for i, c in enumerate(combos) if c == combo]].mean(0) for combo in set(combos)}
    predicted = torch.stack([means[combo] for combo in combos])  # (B, N, D)
    eval_set = world.eval_set()
    return alignment_metrics(predicted, targets, eval_set.probe, eval_set.labels)
