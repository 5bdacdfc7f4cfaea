"""Model side of aligner training, free of Ray and DeepSpeed: the recipe, the trainable module, LR schedule, EMA.

Only the aligner and the soft tokens train. When the soft tokens train, the frozen VLM runs them on top of
each sample's stored prompt cache inside the training step (exact, see gap3d/prompt_encoder.py); when they
are frozen, preprocessing stored their final latents and no VLM is needed. The VLM is held outside the
module's parameters so optimisers, DeepSpeed and checkpoints only ever see what trains.
"""

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from gap3d.aligner import AlignerDiT
from gap3d.config import FlowConfig, TrainConfig
from gap3d.features.format import FeatureBatch
from gap3d.flow import flow_matching_loss
from gap3d.prompt_encoder import PromptEncoder

logger = logging.getLogger(__name__)


class AlignerTrainModule(nn.Module):
    """The trainable parts: the aligner, plus the prompt encoder's soft tokens when they train.

    `soft_tokens` is the very Parameter the prompt encoder reads, so an optimiser step on this module is
    what the VLM sees next step. The prompt encoder itself is kept out of the module tree (frozen, never
    in the optimiser or in checkpoints).
    """

    def __init__(self, aligner: AlignerDiT, flow_config: FlowConfig, prompt_encoder: PromptEncoder | None = None):
        super().__init__()
        self.aligner = aligner
        self.flow_config = flow_config
        self.num_registers = aligner.config.num_special_tokens - 1
        self._prompt_encoder = (prompt_encoder,)  # a tuple hides the frozen VLM from parameters() and state_dict()
        if prompt_encoder is not None:
            if not prompt_encoder.config.trainable:
                raise ValueError("a prompt encoder is only needed in training when vlm.trainable is true")
            self.soft_tokens = prompt_encoder.soft_tokens  # (s, d_vlm)

    @property
    def prompt_encoder(self) -> PromptEncoder | None:
        return self._prompt_encoder[0]

    def forward(self, batch: FeatureBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Flow-matching loss on one micro-batch -> {"loss", "cls", "registers", "patches"} (scalars)."""
        cond = batch_condition(batch, self.prompt_encoder).to(batch.dino.dtype)
        return flow_matching_loss(self.aligner, batch.dino, cond, self.flow_config, self.num_registers, generator)


def batch_condition(batch: FeatureBatch, prompt_encoder: PromptEncoder | None) -> torch.Tensor:
    """The aligner's condition (B, s, d_vlm): soft tokens through the frozen VLM on the batch's prompt caches
    (when the soft tokens train), else the batch's stored soft latents."""
    if prompt_encoder is not None:
        if batch.caches is None:
            raise ValueError("the soft tokens train, so batches need prompt caches (features in prompt_cache mode)")
        return prompt_encoder.soft_latents(batch.caches)
    if batch.latents is None:
        raise ValueError(
            "the soft tokens are frozen, so batches need stored soft latents (features in soft_latents mode)"
        )
    return batch.latents


@dataclass(frozen=True)
class LRContinuation:
    """The LR curve of a run resumed with a changed schedule: from `start_step` on, a cosine from `start_multiplier`
    (the factor on train.lr the run had reached) down to train.min_lr at train.max_steps."""

    start_step: int  # the checkpoint's step, where the new curve begins
    start_multiplier: float  # factor on train.lr at start_step under the schedule the checkpoint was trained with


def lr_multiplier(step: int, config: TrainConfig, continuation: LRContinuation | None = None) -> float:
    """Factor on train.lr for optimiser step `step` (0-based): linear warmup, then cosine decay to train.min_lr,
    or from `continuation.start_step` on the continuation's cosine.

    Ours rather than transformers' cosine-with-min-lr helper: the same curve in a few lines, evaluated at any step.
    """
    floor = config.min_lr / config.lr
    if continuation is not None and step >= continuation.start_step:
        progress = min(1.0, (step - continuation.start_step) / max(1, config.max_steps - continuation.start_step))
        return floor + (continuation.start_multiplier - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, continuation: LRContinuation | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying lr_multiplier; step it once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, continuation))


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything that trains."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def optimizer_groups(module: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups: the aligner at train.lr, the soft tokens at train.lr x train.soft_token_lr_scale."""
    parameters = trainable_parameters(module)
    soft = [p for name, p in parameters.items() if name == "soft_tokens"]
    groups = [{"params": [p for name, p in parameters.items() if name != "soft_tokens"], "lr": config.lr}]
    return groups + ([{"params": soft, "lr": config.lr * config.soft_token_lr_scale}] if soft else [])


def build_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """The recipe's AdamW over optimizer_groups.

    Fused (one kernel over all tensors, on the CPU as on CUDA): the unfused loop launches a dozen ops per tensor,
    a fixed cost per step that at the tiny preset is 3-4 ms of a 70 ms step and does not shrink with more workers.
    """
    return torch.optim.AdamW(
        optimizer_groups(module, config), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999), fused=True
    )


class EMA:
    """Exponential moving average of named parameters in fp32: shadow = decay * shadow + (1 - decay) * param.

    Ours rather than torch.optim.swa_utils.AveragedModel: that keeps its average in the model's dtype, and in
    bf16 an EMA at decay 0.9999 cannot move (steps of 1e-4 are below bf16's 2^-8 resolution).
    """

    def __init__(self, parameters: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, torch.Tensor]) -> None:
        """Move every shadow towards the current parameter value."""
        for name, p in parameters.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadows saved by state_dict(); names and shapes must match."""
        if set(state) != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def split(self, prefix: str) -> dict[str, torch.Tensor]:
        """Shadows whose names start with `prefix.`, with the prefix removed (e.g. "aligner" -> aligner state)."""
        return {name[len(prefix) + 1 :]: value for name, value in self.shadow.items() if name.startswith(prefix + ".")}


def with_soft_tokens(prompt_encoder: PromptEncoder, soft_tokens: torch.Tensor) -> PromptEncoder:
    """A prompt encoder sharing `prompt_encoder`'s frozen VLM but holding its own copy of `soft_tokens` (s, d_vlm)."""
    clone = PromptEncoder(
        prompt_encoder.vlm,
        prompt_encoder.tokenizer,
        prompt_encoder.image_processor,
        prompt_encoder.chat_template,
        prompt_encoder.config,
    )
    with torch.no_grad():
        clone.soft_tokens.copy_(soft_tokens.to(clone.soft_tokens.dtype))
    return clone.requires_grad_(False)
