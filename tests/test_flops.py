"""benchmarks/flops.py: the aligner's training FLOPs as counted on the meta device, against a count by hand."""

import math

from benchmarks.flops import aligner_train_flops, utilisation
from gap3d.config import AlignerConfig

CONFIG = AlignerConfig(
    token_dim=48,
    grid_size=6,
    num_special_tokens=5,
    cond_dim=40,
    num_cond_tokens=8,
    hidden_size=64,
    depth=3,
    num_heads=4,
)


def forward_flops_by_hand(config: AlignerConfig) -> int:
    """One sample's forward matrix FLOPs (2 per multiply-add), layer by layer as gap3d/aligner.py runs them."""
    n, s, h, d = config.num_tokens, config.num_cond_tokens, config.hidden_size, config.token_dim
    mlp = 64 * math.ceil(2 * config.mlp_ratio * h / 3 / 64)
    embed = n * d * h + s * config.cond_dim * h + (256 * h + h * h) + 2 * h * h  # tokens, condition, time, pool
    block = (
        h * 4 * h  # adaLN modulation, once per sample
        + 4 * n * h * h
        + 2 * n * n * h  # self-attention: q, k, v, out; scores and values
        + 2 * n * h * h
        + 2 * s * h * h
        + 2 * n * s * h  # cross-attention: q, out; k, v of the condition; attention
        + 3 * n * h * mlp  # SwiGLU
    )
    final = h * 2 * h + n * h * d
    return 2 * (embed + config.depth * block + final)


def test_a_step_counts_three_forwards_less_the_input_gradients_nobody_needs():
    forward = forward_flops_by_hand(CONFIG)
    # Backward is twice the forward, except that no gradient flows into the noisy tokens or the time features.
    unneeded = 2 * (CONFIG.num_tokens * CONFIG.token_dim * CONFIG.hidden_size + 256 * CONFIG.hidden_size)
    assert abs(aligner_train_flops(CONFIG, 1) / (3 * forward - unneeded) - 1) < 0.01


def test_flops_scale_linearly_with_the_batch():
    assert aligner_train_flops(CONFIG, 6) == 6 * aligner_train_flops(CONFIG, 1)


def test_utilisation_is_achieved_over_peak():
    use = utilisation(flops_per_step=2e12, step_s=0.5, peak_tflops=8.0)
    assert use == {"tflops": 4.0, "bf16_peak_tflops": 8.0, "mfu": 0.5}
    assert utilisation(2e12, 0.5, None)["mfu"] is None
