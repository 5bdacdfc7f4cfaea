"""Tables 1 and 2 as the paper reports them: alignment per token group (patches, CLS, registers) and caption-to-image
retrieval with the pooled patch grid and the CLS token as embeddings (gap3d.metrics.paper_tables)."""

import pytest
import torch
import torch.nn.functional as F

from gap3d.config import load_config
from gap3d.metrics import group_alignment, paper_retrieval, paper_tables, pooled_embedding, summary_embedding

SPECIAL = 5  # CLS + 4 registers, then the patches


def tokens(batch: int = 6, patches: int = 16, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, SPECIAL + patches, dim, generator=torch.Generator().manual_seed(seed))


def test_each_group_is_scored_on_its_own_tokens():
    target = tokens()
    generated = target.clone()
    generated[:, 0] = -target[:, 0]  # the CLS token reversed
    generated[:, SPECIAL:] *= 2.0  # the patches twice as long
    table = group_alignment(generated, target, SPECIAL)
    assert table["cls"]["cosine_mean"] == pytest.approx(-1.0)
    assert table["registers"]["cosine_mean"] == pytest.approx(1.0) and table["registers"]["mse_mean"] == 0.0
    assert table["patches"]["cosine_mean"] == pytest.approx(1.0)
    assert table["patches"]["norm_ratio_mean"] == pytest.approx(2.0)
    assert table["cls"]["norm_ratio_mean"] == pytest.approx(1.0)


def test_group_mse_and_its_std_are_over_samples_of_the_groups_own_mean():
    target, generated = tokens(seed=0), tokens(seed=1)
    per_sample = (generated[:, 1:SPECIAL] - target[:, 1:SPECIAL]).pow(2).mean(dim=(1, 2))
    table = group_alignment(generated, target, SPECIAL)["registers"]
    torch.testing.assert_close(
        torch.tensor([table["mse_mean"], table["mse_std"]]),
        torch.stack([per_sample.mean(), per_sample.std(unbiased=False)]),
    )


def test_a_model_without_registers_has_no_register_group():
    target = tokens()[:, SPECIAL - 1 :]  # CLS then patches
    assert set(group_alignment(target, target, 1)) == {"patches", "cls"}


def test_pooled_is_the_normalised_patch_average_and_summary_the_normalised_cls():
    x = tokens()
    torch.testing.assert_close(pooled_embedding(x, SPECIAL), F.normalize(x[:, SPECIAL:].mean(1), dim=-1))
    torch.testing.assert_close(summary_embedding(x), F.normalize(x[:, 0], dim=-1))


def test_retrieval_reads_each_embedding_from_its_own_tokens():
    target = tokens(batch=12)
    generated = target.clone()
    generated[:, 0] = target[torch.roll(torch.arange(12), 1), 0]  # every CLS names another row
    retrieval = paper_retrieval(generated, target, SPECIAL)
    assert retrieval["pooled"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert retrieval["summary"]["R@1"] == 0.0


def test_paper_tables_hold_table_1_and_table_2():
    target = tokens()
    assert set(paper_tables(target, target, SPECIAL)) == {"alignment", "retrieval"}


def test_the_paper_preset_samples_with_30_steps_at_cfg_3():
    flow = load_config("paper").flow
    assert (flow.sample_steps, flow.cfg_scale) == (30, 3.0)
