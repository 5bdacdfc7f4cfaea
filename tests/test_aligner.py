"""AlignerDiT: shapes, zero-initialised start, RoPE layout, null condition, gradients."""

import pytest
import torch

from gap3d.aligner import AlignerDiT, apply_rope, rope_2d
from gap3d.config import AlignerConfig

TINY = dict(
    token_dim=16,
    grid_size=4,
    num_special_tokens=5,
    cond_dim=24,
    num_cond_tokens=3,
    hidden_size=32,
    depth=2,
    num_heads=2,
)


def make(**overrides) -> AlignerDiT:
    torch.manual_seed(0)
    return AlignerDiT(AlignerConfig(**{**TINY, **overrides}))


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 21, 16, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, 3, 24, generator=g),
    )


def test_output_has_the_shape_of_the_target_tokens():
    x, t, cond = inputs()
    assert make()(x, t, cond).shape == (2, 5 + 4 * 4, 16)


def test_an_aligner_whose_shapes_were_not_derived_refuses_to_build_naming_the_fix():
    with pytest.raises(ValueError, match="derive_shapes"):
        AlignerDiT(AlignerConfig(hidden_size=32, depth=2, num_heads=2))


def test_freshly_initialised_aligner_predicts_zero_velocity():
    x, t, cond = inputs()
    torch.testing.assert_close(make()(x, t, cond), torch.zeros_like(x))


def test_every_parameter_gets_a_gradient_after_one_optimiser_step():
    model = make(null_condition="learned")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, cond = inputs()
    drop = torch.tensor([True, False])
    for _ in range(3):  # zero-initialised output layer, then adaLN gates, then the layers behind them open up
        optimizer.zero_grad()
        model(x, t, cond, drop).sub(x).pow(2).mean().backward()
        optimizer.step()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_dropped_condition_is_replaced_by_the_null_condition():
    model = make(null_condition="learned")
    torch.nn.init.normal_(model.final_layer.linear.weight)
    for block in model.blocks:
        torch.nn.init.ones_(block.cross_attn.gate)
    x, t, cond = inputs()
    dropped = model(x, t, cond, torch.tensor([True, True]))
    null = model.null_cond.detach().expand_as(cond)
    torch.testing.assert_close(dropped, model(x, t, null))
    assert not torch.allclose(dropped, model(x, t, cond), atol=1e-4)


def test_zeros_null_condition_has_no_parameters():
    model = make(null_condition="zeros")
    assert "null_cond" not in dict(model.named_parameters())
    assert not model.null_cond.any()


def test_rope_leaves_special_tokens_unrotated_and_rotates_patches_by_row_and_column():
    cos, sin = rope_2d(grid_size=3, num_special=5, head_dim=8, theta=10000.0)
    assert cos.shape == (5 + 9, 4)
    torch.testing.assert_close(cos[:5], torch.ones(5, 4))
    torch.testing.assert_close(sin[:5], torch.zeros(5, 4))
    # patch (row 1, col 2) is token 5 + 1 * 3 + 2; lowest frequency pair of each axis has frequency 1
    assert sin[5 + 5, 0] == pytest.approx(torch.tensor(1.0).sin().item())
    assert sin[5 + 5, 2] == pytest.approx(torch.tensor(2.0).sin().item())


def test_rope_in_bf16_stays_within_two_bf16_steps_of_the_float32_rotation():
    cos, sin = rope_2d(grid_size=16, num_special=5, head_dim=64, theta=10000.0)
    q = torch.randn(2, 4, 5 + 16 * 16, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    rotated = apply_rope(q, cos, sin)
    assert rotated.dtype == torch.bfloat16
    in_float32 = apply_rope(q.float(), cos, sin)  # what the rotation computed before it stayed in bf16
    # A rotation keeps each channel pair's length: errors count in bf16 steps at that length (8 bits of mantissa).
    length = in_float32.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(-1, -1, -1, -1, 2).flatten(-2)
    step = 2.0 ** (torch.floor(torch.log2(length)) - 7)
    assert ((rotated.float() - in_float32).abs() / step).max() <= 2.0


def test_rope_preserves_norms_and_relative_positions():
    cos, sin = rope_2d(grid_size=4, num_special=5, head_dim=8, theta=100.0)
    q = torch.randn(1, 1, 21, 8)
    rotated = apply_rope(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    same = torch.randn(8).expand(1, 1, 21, 8)
    scores = (apply_rope(same, cos, sin) @ apply_rope(same, cos, sin).transpose(-1, -2))[0, 0]
    # patch (0,0)->(0,1) and (1,1)->(1,2) have the same offset, hence the same score
    assert scores[5 + 0, 5 + 1].item() == pytest.approx(scores[5 + 5, 5 + 6].item(), rel=1e-5)


def test_wrong_input_shape_is_rejected_with_the_expected_shape():
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=r"\(B, 21, 16\)"):
        make()(x[:, :20], t, cond)
    with pytest.raises(ValueError, match=r"\(B, 3, 24\)"):
        make()(x, t, cond[:, :2])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=33), "not divisible"),
        (dict(hidden_size=24, num_heads=4), "divisible by 4"),
        (dict(null_condition="random"), "null_condition"),
        (dict(depth=0), "aligner.depth"),
        (dict(grid_size=0), "aligner.grid_size"),
    ],
)
def test_invalid_config_raises_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        AlignerConfig(**{**TINY, **overrides})


def with_random_output_layer(aligner: AlignerDiT) -> AlignerDiT:
    """The zero-initialised final layer hides everything upstream; give it weights so the blocks show through."""
    torch.manual_seed(2)
    for p in aligner.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return aligner


@pytest.mark.parametrize("gate, depends", [(0.0, False), (1.0, True)])
def test_cross_attention_gates_starting_closed_hide_the_condition(gate, depends):
    aligner = with_random_output_layer(make(cross_gate_init=gate, pooled_condition=False))
    x, t, cond = inputs()
    with torch.no_grad():
        changed = aligner(x, t, cond.flip(0)) - aligner(x, t, cond)
    assert (changed.abs().max() > 1e-3) == depends


def test_absolute_positions_tell_equal_patch_tokens_apart():
    x, t, cond = inputs(batch=1)
    x[:, 5:] = x[:, 5:6]  # every patch token the same
    spread = {}
    for absolute in (False, True):
        aligner = with_random_output_layer(make(absolute_positions=absolute))
        aligner.rope_cos.fill_(1.0)  # RoPE off: only an absolute embedding can say where a patch is
        aligner.rope_sin.zero_()
        with torch.no_grad():
            spread[absolute] = aligner(x, t, cond)[0, 5:].std(dim=0).max().item()
    assert spread[False] < 1e-4 and spread[True] > 1e-2
