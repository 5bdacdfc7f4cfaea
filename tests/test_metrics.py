"""Alignment metrics on hand-computed cases."""

import pytest
import torch

from gap3d.metrics import (
    AttributeProbe,
    alignment_metrics,
    class_report,
    nearest_targets,
    norm_ratio,
    prompt_specific_cosine,
    retrieval_recall,
    token_cosine,
    token_mse,
)


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


def test_recall_counts_a_tie_as_half_a_rank():
    targets = torch.eye(2).view(2, 1, 2)
    queries = torch.ones(2, 1, 2)  # equally close to both targets
    assert retrieval_recall(queries, targets, ks=(1,)) == {1: 1.0}  # rank 0.5 < 1
    three = torch.eye(3).view(3, 1, 3)
    assert retrieval_recall(torch.ones(3, 1, 3), three, ks=(1, 2)) == {1: 0.0, 2: 1.0}  # rank 1 for every query


def test_recall_at_k_counts_queries_whose_target_ranks_within_k():
    targets = torch.eye(4).view(4, 1, 4)
    # true target ranks: query 0 -> 0; query 1 -> 1 (target 2 first); query 2 -> 3;
    # query 3 -> 2 (target 2 above it, targets 0 and 1 tied with it at half a rank each)
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1.0, 0], [0.5, 0.3, 0.1, 1.0], [0, 0, 1.0, 0]]).view(4, 1, 4)
    recall = retrieval_recall(queries, targets, ks=(1, 2, 3, 4))
    assert recall == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_alignment_metrics_of_a_perfect_generation():
    target = torch.randn(6, 5, 8)
    metrics = alignment_metrics(target.clone(), target)
    assert metrics["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mse_mean"] == 0.0
    assert metrics["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert (metrics["recall@1"], metrics["recall@5"], metrics["recall@10"]) == (1.0, 1.0, 1.0)


def test_prompt_specific_cosine_is_the_cosine_after_removing_the_mean():
    mean = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    target = mean + torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    generated = mean + torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # centred: (2, 0, 0, 2) against (1, 0, 0, 0)
    torch.testing.assert_close(prompt_specific_cosine(generated, target, mean), torch.tensor([2.0 / (8**0.5)]))


def test_the_mean_target_scores_zero_prompt_specific_cosine_and_chance_centred_recall():
    targets = torch.randn(40, 6, 4) + 5.0  # a large shared part, as backgrounds give
    blind = targets.mean(0, keepdim=True).expand_as(targets)
    metrics = alignment_metrics(blind, targets)
    assert metrics["prompt_cosine_mean"] == 0.0
    assert metrics["cosine_mean"] > 0.9  # the raw cosine rewards it
    # Centred, the blind query is zero and ties with every target: it ranks in the middle of 40, never first.
    assert metrics["centred_recall@1"] == metrics["centred_recall@10"] == 0.0


def test_centred_retrieval_ignores_what_every_target_shares():
    shared = torch.zeros(1, 3, 4)
    shared[0, :, 0] = 100.0  # dominates the raw cosine of every pair
    targets = shared + torch.eye(4)[:3].view(3, 1, 4).expand(3, 3, 4) * torch.tensor([0.0, 1.0, 1.0, 1.0])
    queries = targets.clone()
    queries[:, :, 1:] = queries[:, :, 1:].roll(1, dims=0)  # each query carries the next row's specific part
    assert retrieval_recall(queries, targets, ks=(1,), mean=targets.mean(0))[1] == 0.0
    assert retrieval_recall(targets, targets, ks=(1,), mean=targets.mean(0))[1] == 1.0


def test_nearest_targets_names_the_best_match_of_each_query():
    targets = torch.eye(3).view(3, 1, 3)
    queries = torch.tensor([[0.0, 0.1, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.2]]).view(3, 1, 3)
    assert nearest_targets(queries, targets) == [2, 0, 1]


def test_probe_reads_the_class_of_tokens_near_its_centroid():
    centres = {"red": torch.tensor([1.0, 0.0, 0.0]), "blue": torch.tensor([0.0, 1.0, 0.0])}
    labels = {"color": ["red", "blue"] * 10}
    targets = torch.stack([centres[c] + 0.05 * torch.randn(3) for c in labels["color"]]).view(20, 1, 3)
    probe = AttributeProbe(targets, labels)
    queries = torch.stack([centres["blue"], centres["red"], centres["blue"]]).view(3, 1, 3)
    assert probe.predict(queries) == {"color": ["blue", "red", "blue"]}
    assert probe.accuracy(queries, {"color": ["blue", "blue", "blue"]}) == {"color": pytest.approx(2 / 3)}


def masked_objects(shapes: list[str], colors: list[str], noise: float = 0.05) -> torch.Tensor:
    """4 x 4 patch images as tokens: a shape's patches carry its colour's vector, the rest a fixed background
    -> (B, 16, 4)."""
    masks = {"bar": [1, 5, 9, 13], "row": [4, 5, 6, 7], "block": [5, 6, 9, 10], "corner": [0, 1, 4]}
    hues = {"red": [1.0, 0, 0, 0], "green": [0, 1.0, 0, 0], "blue": [0, 0, 1.0, 0]}
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([0, 0, 0, 1.0]).repeat(len(shapes), 16, 1)
    for row, (shape, color) in enumerate(zip(shapes, colors)):
        tokens[row, masks[shape]] = torch.tensor(hues[color])
    return tokens + noise * torch.randn(tokens.shape, generator=g)


def test_probe_reads_shape_and_colour_of_combinations_it_never_saw():
    pairs = [(s, c) for s in ("bar", "row", "block", "corner") for c in ("red", "green", "blue")]
    held_out = {("bar", "red"), ("row", "green"), ("block", "blue"), ("corner", "red")}
    train = [pair for pair in pairs if pair not in held_out] * 6
    probe = AttributeProbe(
        masked_objects(*map(list, zip(*train))), {"shape": [s for s, _ in train], "color": [c for _, c in train]}
    )
    shapes, colors = map(list, zip(*sorted(held_out)))
    assert probe.accuracy(masked_objects(shapes, colors), {"shape": shapes, "color": colors}) == {
        "shape": 1.0,
        "color": 1.0,
    }


def test_alignment_metrics_report_attribute_accuracy_when_given_a_probe_and_labels():
    targets = torch.randn(8, 2, 3)
    labels = {"shape": ["cube", "cone"] * 4}
    metrics = alignment_metrics(targets.clone(), targets, AttributeProbe(targets, labels), labels)
    assert 0.5 < metrics["shape_accuracy"] <= 1.0
    assert "shape_accuracy" not in alignment_metrics(targets.clone(), targets)


def test_class_report_gives_accuracy_per_class_and_the_confusions():
    report = class_report(["cube", "cube", "torus", "torus"], ["cube", "sphere", "sphere", "sphere"])
    assert report["accuracy"] == 0.25
    assert report["per_class"] == {"cube": 0.5, "torus": 0.0}  # the pooled 0.25 hides a class never read right
    assert report["confusion"] == {"cube": {"cube": 1, "sphere": 1}, "torus": {"sphere": 2}}
