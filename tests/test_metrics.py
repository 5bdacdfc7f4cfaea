"""Alignment metrics on hand-computed cases."""

import pytest
import torch

from gap3d.metrics import alignment_metrics, norm_ratio, retrieval_recall, token_cosine, token_mse


def test_cosine_of_orthogonal_identical_and_opposite_tokens():
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    generated = torch.tensor([[[0.0, 5.0], [0.0, 1.0], [-1.0, 0.0]]])
    torch.testing.assert_close(token_cosine(generated, target), torch.tensor([(0.0 + 1.0 - 1.0) / 3]))


def test_mse_is_mean_over_tokens_and_features():
    target = torch.zeros(1, 2, 2)
    generated = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(token_mse(generated, target), torch.tensor([(1 + 4 + 9 + 16) / 4]))


def test_norm_ratio_is_mean_of_per_token_ratios():
    target = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # norms 5, 1
    generated = torch.tensor([[[6.0, 8.0], [0.0, 0.5]]])  # norms 10, 0.5
    torch.testing.assert_close(norm_ratio(generated, target), torch.tensor([(2.0 + 0.5) / 2]))


def test_recall_at_k_counts_queries_whose_target_ranks_within_k():
    targets = torch.eye(4).view(4, 1, 4)
    # true target ranks: query 0 -> 0; query 1 -> 1 (target 2 first); query 2 -> 3; query 3 -> 1
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1.0, 0], [0.5, 0.3, 0.1, 1.0], [0, 0, 1.0, 0]]).view(4, 1, 4)
    recall = retrieval_recall(queries, targets, ks=(1, 2, 4))
    assert recall == {1: 0.25, 2: 0.75, 4: 1.0}


def test_alignment_metrics_of_a_perfect_generation():
    target = torch.randn(6, 5, 8)
    metrics = alignment_metrics(target.clone(), target)
    assert metrics["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mse_mean"] == 0.0
    assert metrics["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert (metrics["recall@1"], metrics["recall@5"], metrics["recall@10"]) == (1.0, 1.0, 1.0)
