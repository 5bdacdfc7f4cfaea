"""AlignerDiT: a diffusion transformer that generates DINOv2 tokens from VLM soft-token latents.

The sequence is the TRELLIS conditioning layout: `num_special_tokens` tokens (CLS + registers) first, then
the grid_size x grid_size patch grid, each of dim `token_dim`. Patches get 2-D rotary positions (row,
column); the special tokens get learned role embeddings and identity rotation. The VLM latents are
projected to the hidden size and read through tanh-gated cross-attention in every block; their mean joins
the timestep embedding that drives the adaLN modulation (scale and gate, Lumina-Next style), zero-initialised
so every block starts as the identity. Time t is in [0, 1] (see gap3d/flow.py); the embedder scales it by
1000 internally. The config (gap3d.config.AlignerConfig) gets its token and condition shapes from the encoders.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gap3d.config import AlignerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def rope_2d(grid_size: int, num_special: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim/2): half the frequencies rotate by row, half by column; special tokens don't
    rotate."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (head_dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (grid^2, head_dim/2)
    angles = torch.cat([torch.zeros(num_special, angles.shape[1], dtype=angles.dtype), angles])  # (N, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """DiT's fixed absolute position embedding of a grid: half the channels encode the row, half the column.

    -> (grid^2, dim), row-major like the patch tokens.
    """
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    parts = [angle.reshape(-1, 1) * freqs for angle in (rows, cols)]  # each (grid^2, dim/4)
    embedding = torch.cat([torch.cat([part.sin(), part.cos()], dim=1) for part in parts], dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1])).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, hd) by the angles in cos/sin (N, hd/2), in x's dtype: a float32
    round trip would double the memory traffic of bf16 queries and keys, for a result within two bf16 steps of it."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, N, hd/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head attention; self-attention with RoPE when `context` is None, else cross-attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, cross: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        # Cross-attention enters through a per-head tanh gate that starts closed (Lumina-Next).
        self.gate = nn.Parameter(torch.zeros(num_heads)) if cross else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: tuple | None = None) -> torch.Tensor:
        B, N, C = x.shape
        source = x if context is None else context
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.kv(source).view(B, source.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        if self.gate is not None:
            out = out * self.gate.tanh().view(1, -1, 1, 1).to(out.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = 64 * math.ceil(2 * mlp_ratio * dim / 3 / 64)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden) through sinusoidal features of 1000 * t and an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None])


class AlignerBlock(nn.Module):
    """Self-attention (RoPE) -> gated cross-attention to the condition -> SwiGLU, adaLN scale/gate around each."""

    def __init__(self, config: AlignerConfig):
        super().__init__()
        dim = config.hidden_size
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, config.num_heads, config.qk_norm, cross=False)
        self.cross_norm = RMSNorm(dim)
        self.cross_attn = Attention(dim, config.num_heads, config.qk_norm, cross=True)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, config.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond: torch.Tensor, rope: tuple) -> torch.Tensor:
        scale_attn, gate_attn, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=-1)  # each (B, hidden)
        x = x + gate_attn.tanh()[:, None] * self.attn(modulate(self.attn_norm(x), scale_attn), rope=rope)
        x = x + self.cross_attn(self.cross_norm(x), context=cond)
        return x + gate_mlp.tanh()[:, None] * self.mlp(modulate(self.mlp_norm(x), scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


class AlignerDiT(nn.Module):
    """(x_t (B, N, D), t (B,), cond (B, s, d_vlm), drop_cond (B,) bool) -> velocity (B, N, D)."""

    def __init__(self, config: AlignerConfig):
        super().__init__()
        if not config.shapes_derived:
            raise ValueError(
                "the aligner's token and condition shapes are unset: derive them from the encoders with "
                "gap3d.build.derive_shapes(config)"
            )
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = nn.Linear(config.token_dim, hidden)
        self.special_embed = nn.Parameter(torch.zeros(config.num_special_tokens, hidden))  # roles of CLS and registers
        self.t_embedder = TimestepEmbedder(hidden)
        self.cond_embedder = nn.Sequential(nn.LayerNorm(config.cond_dim), nn.Linear(config.cond_dim, hidden))
        self.cond_pool = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if config.null_condition == "learned":
            self.null_cond = nn.Parameter(torch.zeros(config.num_cond_tokens, config.cond_dim))
        self.blocks = nn.ModuleList([AlignerBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(hidden, config.token_dim)
        self.init_buffers()
        self.initialize_weights()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers: RoPE tables and the zero null condition.

        Called again after a meta-device build whose weights were then loaded (gap3d.export.load_export).
        """
        config = self.config
        cos, sin = rope_2d(
            config.grid_size, config.num_special_tokens, config.hidden_size // config.num_heads, config.rope_theta
        )
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (N, head_dim/2)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if config.null_condition == "zeros":
            self.register_buffer(
                "null_cond", torch.zeros(config.num_cond_tokens, config.cond_dim, device=device), persistent=False
            )
        if config.absolute_positions:
            self.register_buffer(
                "patch_pos", sincos_2d(config.grid_size, config.hidden_size).to(device), persistent=False
            )  # (grid^2, hidden)

    def initialize_weights(self) -> None:
        """Xavier linears; adaLN modulation, special/null embeddings and the output layer start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.special_embed, std=0.02)
        if isinstance(self.null_cond, nn.Parameter):
            nn.init.normal_(self.null_cond, std=0.02)
        for mlp in (self.t_embedder.mlp, self.cond_pool):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.gate, self.config.cross_gate_init)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        config = self.config
        if x.shape[1:] != (config.num_tokens, config.token_dim):
            raise ValueError(
                f"aligner input must be (B, {config.num_tokens}, {config.token_dim}), got {tuple(x.shape)}"
            )
        if cond.shape[1:] != (config.num_cond_tokens, config.cond_dim):
            raise ValueError(
                f"aligner condition must be (B, {config.num_cond_tokens}, {config.cond_dim}), got {tuple(cond.shape)}"
            )
        if drop_cond is not None:
            cond = torch.where(drop_cond.view(-1, 1, 1), self.null_cond.to(cond.dtype).expand_as(cond), cond)
        h = self.x_embedder(x)  # (B, N, hidden)
        special = config.num_special_tokens
        patches = h[:, special:] + self.patch_pos if config.absolute_positions else h[:, special:]
        h = torch.cat([h[:, :special] + self.special_embed, patches], dim=1)
        cond_h = self.cond_embedder(cond)  # (B, s, hidden)
        c = self.t_embedder(t)  # (B, hidden)
        if config.pooled_condition:
            c = c + self.cond_pool(cond_h.mean(dim=1))
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            h = block(h, c, cond_h, rope)
        return self.final_layer(h, c)  # (B, N, D)
