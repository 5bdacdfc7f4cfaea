"""Model side of training without Ray: train module, schedule, EMA, feature batches and start-up checks."""

import math

import pytest
import torch

from gap3d.build import build_aligner
from gap3d.config import load_config
from gap3d.features.format import MANIFEST_NAME
from gap3d.features.store import check_features, load_rows
from gap3d.flow import flow_matching_loss
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import (
    EMA,
    AlignerTrainModule,
    LRContinuation,
    batch_condition,
    build_optimizer,
    lr_multiplier,
    lr_schedule,
    optimizer_groups,
    trainable_parameters,
    with_soft_tokens,
)
from tests.support import small_config, synthetic_features


@pytest.fixture(scope="module")
def config():
    return small_config()


@pytest.fixture(scope="module")
def features(config):
    return synthetic_features(config, 120)


@pytest.fixture(scope="module")
def batch(config, features):
    return load_rows(str(features[0]), config, limit=8)[0]


def make_module(config, seed=0):
    prompt_encoder = PromptEncoder.from_pretrained(config.vlm)
    return AlignerTrainModule(build_aligner(config, seed=seed), config.flow, prompt_encoder)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    train = load_config(
        "tiny", overrides=["train.max_steps=100", "train.warmup_ratio=0.1", "train.lr=1e-3", "train.min_lr=1e-4"]
    ).train
    lrs = [train.lr * lr_multiplier(step, train) for step in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    reference = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(10, 100)]
    assert lrs[10:] == pytest.approx(reference)
    assert train.lr * lr_multiplier(100, train) == pytest.approx(1e-4)


def test_lr_continuation_follows_a_cosine_from_its_start_factor_to_min_lr_at_the_new_end():
    train = load_config(
        "tiny", overrides=["train.max_steps=200", "train.warmup_ratio=0.1", "train.lr=1e-3", "train.min_lr=1e-4"]
    ).train
    continuation = LRContinuation(start_step=60, start_multiplier=0.8)
    before = [lr_multiplier(step, train, continuation) for step in range(60)]
    assert before == [lr_multiplier(step, train) for step in range(60)]
    after = [train.lr * lr_multiplier(step, train, continuation) for step in range(60, 201)]
    reference = [1e-4 + 0.5 * (0.8e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 60) / 140)) for s in range(60, 201)]
    assert after == pytest.approx(reference)


def test_lr_scheduler_sets_the_optimizer_lr_each_step():
    train = load_config("tiny", overrides=["train.max_steps=20"]).train
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
    scheduler = lr_schedule(optimizer, train)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([train.lr * lr_multiplier(step, train) for step in range(5)])


def test_ema_matches_the_reference_recursion():
    params = {"w": torch.tensor([1.0, 2.0])}
    ema = EMA(params, decay=0.9)
    expected = params["w"].clone()
    for value in (3.0, -1.0, 0.5):
        params["w"] = torch.full((2,), value)
        ema.update(params)
        expected = 0.9 * expected + 0.1 * params["w"]
    torch.testing.assert_close(ema.shadow["w"], expected)


def test_ema_state_round_trips_and_rejects_other_models():
    ema = EMA({"a.x": torch.ones(3), "b": torch.zeros(1)}, decay=0.5)
    other = EMA({"a.x": torch.zeros(3), "b": torch.ones(1)}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["a.x"], torch.ones(3))
    assert list(ema.split("a")) == ["x"]
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"a.x": torch.ones(3)})


def test_train_module_holds_aligner_and_soft_tokens_but_not_the_vlm(config):
    module = make_module(config)
    names = set(trainable_parameters(module))
    assert "soft_tokens" in names and any(name.startswith("aligner.") for name in names)
    assert not any("vlm" in name for name, _ in module.named_parameters())
    assert module.soft_tokens is module.prompt_encoder.soft_tokens


def test_condition_from_stored_caches_matches_a_full_prompt_forward(config, features):
    module = make_module(config)
    batch, captions, _ = load_rows(str(features[0]), config, limit=4)
    with torch.no_grad():
        full = module.prompt_encoder(captions)
        from_caches = batch_condition(batch, module.prompt_encoder)
    # The stored caches are fp16, so agreement is to fp16 precision.
    torch.testing.assert_close(from_caches, full, atol=2e-2, rtol=2e-2)


def test_loss_is_flow_matching_on_the_soft_token_condition(config, batch):
    module = make_module(config)
    losses = module(batch, torch.Generator().manual_seed(3))
    cond = batch_condition(batch, module.prompt_encoder)
    reference = flow_matching_loss(
        module.aligner, batch.dino, cond, config.flow, num_registers=4, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(losses["loss"], reference["loss"])


def test_a_train_step_updates_aligner_and_soft_tokens_but_not_the_vlm(config, batch):
    module = make_module(config)
    vlm_before = [p.clone() for p in module.prompt_encoder.vlm.parameters()]
    soft_before = module.soft_tokens.detach().clone()
    optimizer = torch.optim.AdamW(trainable_parameters(module).values(), lr=1e-2)
    module(batch, torch.Generator().manual_seed(0))["loss"].backward()
    optimizer.step()
    assert not torch.equal(module.soft_tokens.detach(), soft_before)
    assert all(torch.equal(a, b) for a, b in zip(vlm_before, module.prompt_encoder.vlm.parameters()))


def test_repeated_steps_on_one_batch_lower_the_loss(config, batch):
    module = make_module(config)
    optimizer = torch.optim.AdamW(trainable_parameters(module).values(), lr=3e-3)

    def loss():
        return module(batch, torch.Generator().manual_seed(0))["loss"]

    first = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first


def test_frozen_soft_tokens_train_on_stored_latents_without_a_vlm():
    config = small_config("vlm.trainable=false")
    batch = load_rows(str(synthetic_features(config, 40)[0]), config, limit=4)[0]
    assert batch.caches is None and batch.latents.shape == (4, config.vlm.num_soft_tokens, config.aligner.cond_dim)
    module = AlignerTrainModule(build_aligner(config, seed=0), config.flow)
    assert set(trainable_parameters(module)) == {f"aligner.{n}" for n, _ in module.aligner.named_parameters()}
    assert torch.isfinite(module(batch)["loss"])


def test_soft_token_clone_shares_the_vlm_and_keeps_the_original_tokens(config):
    encoder = PromptEncoder.from_pretrained(config.vlm)
    original = encoder.soft_tokens.detach().clone()
    clone = with_soft_tokens(encoder, torch.zeros_like(original))
    assert clone.vlm is encoder.vlm
    assert torch.equal(clone.soft_tokens, torch.zeros_like(original))
    assert torch.equal(encoder.soft_tokens.detach(), original)


def test_missing_features_name_the_path_and_the_preprocessing_job(config, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no feature manifest at {tmp_path}.*preprocess"):
        check_features(str(tmp_path), config)


def test_features_without_shards_are_refused(config, features, tmp_path):
    (tmp_path / MANIFEST_NAME).write_text((features[0] / MANIFEST_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*.parquet feature shards"):
        check_features(str(tmp_path), config)


def test_features_from_another_encoder_are_refused_naming_it(config, features):
    other = small_config("vlm.prompt_template=Describe {caption}")
    with pytest.raises(ValueError, match="prompt_template: features have"):
        check_features(str(features[0]), other)


def test_features_of_another_dino_image_size_are_refused_naming_it(features):
    other = small_config("dino.image_size=56")
    with pytest.raises(ValueError, match="dino_image_size: features have 112, config has 56"):
        check_features(str(features[0]), other)


def test_soft_tokens_step_at_the_learning_rate_times_their_scale(config):
    module = make_module(config)
    train = load_config("tiny", overrides=["train.lr=1e-3", "train.soft_token_lr_scale=0.1"]).train
    groups = optimizer_groups(module, train)
    soft = [group for group in groups if any(p is module.soft_tokens for p in group["params"])]
    assert [group["lr"] for group in soft] == [pytest.approx(1e-4)]
    assert sum(len(group["params"]) for group in groups) == len(trainable_parameters(module))
    assert [group["lr"] for group in groups if group not in soft] == [1e-3]


def test_the_recipes_fused_optimizer_steps_like_the_reference_adamw(config, batch):
    train = load_config("tiny", overrides=["train.lr=1e-2", "train.weight_decay=0.5"]).train
    fused_module, reference_module = make_module(config), make_module(config)
    fused = build_optimizer(fused_module, train)
    reference = torch.optim.AdamW(
        optimizer_groups(reference_module, train), lr=train.lr, weight_decay=train.weight_decay, foreach=False
    )
    # Both step on the very same gradients (one backward, copied), so only the optimisers' arithmetic can differ:
    # two backward passes may round differently, and Adam turns a near-zero gradient's rounding into a full lr step.
    for step in range(3):
        fused_module(batch, torch.Generator().manual_seed(step))["loss"].backward()
        for name, param in trainable_parameters(reference_module).items():
            param.grad = trainable_parameters(fused_module)[name].grad.clone()
        for optimizer in (fused, reference):
            optimizer.step()
            optimizer.zero_grad()
    for name, value in trainable_parameters(fused_module).items():
        torch.testing.assert_close(value, trainable_parameters(reference_module)[name], msg=name)
