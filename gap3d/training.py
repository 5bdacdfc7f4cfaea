"""Model side of aligner training, free of Ray and DeepSpeed: the trainable module, LR schedule, EMA, evaluation.

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
from gap3d.config import TrainConfig
from gap3d.flow import FlowConfig, flow_matching_loss, sample
from gap3d.metrics import alignment_metrics
from gap3d.prompt_encoder import PromptCache, PromptEncoder

logger = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One micro-batch of feature rows, as tensors."""

    dino: torch.Tensor  # (B, N, D) DINOv2 targets
    caches: list[PromptCache] | None = None  # prompt caches, when the soft tokens train
    latents: torch.Tensor | None = None  # (B, s, d_vlm) stored soft-token latents, when they are frozen

    def __len__(self) -> int:
        return self.dino.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> "TrainBatch":
        """Move to `device`; targets and latents take `dtype`, prompt caches `cache_dtype` (the VLM's; default `dtype`)."""
        cache_dtype = cache_dtype or dtype
        caches = None if self.caches is None else [PromptCache(c.key_values.to(device, cache_dtype), c.next_position) for c in self.caches]
        latents = None if self.latents is None else self.latents.to(device, dtype)
        return TrainBatch(self.dino.to(device, dtype), caches, latents)


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

    def condition(self, batch: TrainBatch) -> torch.Tensor:
        """The aligner's condition (B, s, d_vlm): soft tokens through the VLM on the prompt caches, or stored latents."""
        if self.prompt_encoder is not None:
            if batch.caches is None:
                raise ValueError("the soft tokens train, so batches need prompt caches (features in prompt_cache mode)")
            return self.prompt_encoder.soft_latents(batch.caches)
        if batch.latents is None:
            raise ValueError("the soft tokens are frozen, so batches need stored soft latents (features in soft_latents mode)")
        return batch.latents

    def forward(self, batch: TrainBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Flow-matching loss on one micro-batch -> {"loss", "cls", "registers", "patches"} (scalars)."""
        cond = self.condition(batch).to(batch.dino.dtype)
        return flow_matching_loss(self.aligner, batch.dino, cond, self.flow_config, self.num_registers, generator)


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Factor on train.lr for optimiser step `step` (0-based): linear warmup, then cosine decay to train.min_lr."""
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    floor = config.min_lr / config.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying lr_multiplier; step it once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything that trains."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class EMA:
    """Exponential moving average (fp32) of named parameters: shadow = decay * shadow + (1 - decay) * param."""

    def __init__(self, parameters: dict[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
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


@torch.no_grad()
def generate_tokens(aligner: AlignerDiT, cond: torch.Tensor, flow_config: FlowConfig, seed: int, batch_size: int = 32) -> torch.Tensor:
    """Sample DINOv2-space tokens for conditions (B, s, d_vlm) -> (B, N, D), in chunks, noise fixed by `seed`."""
    shape = (aligner.config.num_tokens, aligner.config.token_dim)
    generator = torch.Generator(device=cond.device).manual_seed(seed)
    chunks = [
        sample(aligner, part, shape, flow_config.sample_steps, flow_config.cfg_scale, flow_config.solver, generator)
        for part in cond.split(batch_size)
    ]
    return torch.cat(chunks)


def evaluate_alignment(aligner: AlignerDiT, cond: torch.Tensor, targets: torch.Tensor, flow_config: FlowConfig, seed: int = 0) -> dict[str, float]:
    """Alignment metrics (cosine, MSE, norm ratio, recall@k) of samples for cond (B, s, d) against targets (B, N, D)."""
    was_training = aligner.training
    aligner.eval()
    generated = generate_tokens(aligner, cond, flow_config, seed)
    aligner.train(was_training)
    return alignment_metrics(generated, targets.to(generated.device))


def with_soft_tokens(prompt_encoder: PromptEncoder, soft_tokens: torch.Tensor) -> PromptEncoder:
    """A prompt encoder sharing `prompt_encoder`'s frozen VLM but holding its own copy of `soft_tokens` (s, d_vlm)."""
    clone = PromptEncoder(prompt_encoder.vlm, prompt_encoder.tokenizer, prompt_encoder.image_processor, prompt_encoder.chat_template, prompt_encoder.config)
    with torch.no_grad():
        clone.soft_tokens.copy_(soft_tokens.to(clone.soft_tokens.dtype))
    return clone.requires_grad_(False)


def optimizer_state_digest(state) -> float:
    """Sum of |x| over every tensor in a (nested) optimiser state: equal digests mean equal states, in practice."""
    if isinstance(state, torch.Tensor):
        return state.detach().double().abs().sum().item() if state.is_floating_point() else float(state.sum().item())
    if isinstance(state, dict):
        return sum(optimizer_state_digest(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(optimizer_state_digest(value) for value in state)
    return 0.0
