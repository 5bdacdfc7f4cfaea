"""Alignment metrics between generated and true DINOv2 tokens, all on (B, N, D) tensors.

Raw cosine rewards the prompt-blind mean: targets share much (black backgrounds, position structure), so the
mean target scores high against every sample. Beside it stand metrics a prompt-blind generator cannot pass:
the prompt-specific cosine cos(g - mu, y - mu) with mu the mean of the gallery's targets (0 for the mean
itself), retrieval on those centred embeddings (chance k / B), and attribute accuracy of a linear probe
fit on true training targets (chance 1 / number of values).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_cosine(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over tokens of the cosine similarity: (B, N, D) x2 -> (B,)."""
    return F.cosine_similarity(generated.float(), target.float(), dim=-1).mean(dim=-1)


def token_mse(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error: (B, N, D) x2 -> (B,)."""
    return (generated.float() - target.float()).pow(2).mean(dim=(1, 2))


def norm_ratio(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over tokens of ||generated|| / ||target||: (B, N, D) x2 -> (B,)."""
    return (generated.float().norm(dim=-1) / target.float().norm(dim=-1).clamp_min(1e-12)).mean(dim=-1)


def prompt_specific_cosine(generated: torch.Tensor, target: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of the whole embeddings after removing the gallery mean: cos(g - mu, y - mu).

    (B, N, D) x2 and mean (N, D) -> (B,); a sample equal to the mean scores 0.
    """
    g = (generated.float() - mean.float()).flatten(1)
    y = (target.float() - mean.float()).flatten(1)
    return F.cosine_similarity(g, y, dim=-1, eps=1e-12)


def _similarity(queries: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """(B, B) cosine of token-flattened queries and targets, after subtracting `mean` (N, D) when given."""
    if mean is not None:
        queries, targets = queries.float() - mean.float(), targets.float() - mean.float()
    return F.normalize(queries.float().flatten(1), dim=-1) @ F.normalize(targets.float().flatten(1), dim=-1).T


def nearest_targets(queries: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor | None = None) -> list[int]:
    """Index of the target each query ranks first (text->image retrieval top-1): (B, N, D) x2 -> B indices."""
    return _similarity(queries, targets, mean).argmax(dim=1).tolist()


def retrieval_recall(
    queries: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10), mean: torch.Tensor | None = None
) -> dict[int, float]:
    """Text->image recall@k: query i (generated from caption i) should rank target i first.

    Similarity is the cosine of the token-flattened embeddings, after subtracting `mean` (N, D) from both when
    given. (B, N, D) x2 -> {k: recall in [0, 1]}.
    """
    similarity = _similarity(queries, targets, mean)  # (B, B)
    correct = similarity.diagonal()[:, None]
    # Rank = targets scored higher than the true one, ties split evenly: a constant query (the mean target) that
    # ties with every target ranks in the middle, not first.
    ties = (similarity == correct).sum(dim=1) - 1
    rank = (similarity > correct).sum(dim=1) + 0.5 * ties
    return {k: (rank < k).float().mean().item() for k in ks}


class AttributeProbe:
    """Reads each attribute (shape, colour, ...) from DINOv2 tokens with a linear classifier fit on true targets.

    Per attribute, a ridge classifier on one view of the standardised tokens: their mean over tokens, the map of
    how far each token lies from the mean target at its position (where an image differs from the average one:
    the silhouette of a centred object), or the mean of those differences weighted by their size (what the
    object's tokens share: its colour, whatever its silhouette). All tokens flattened is not a view: with
    thousands of features per few hundred rows it fits the training pairs and misreads held-out ones. The view
    and the ridge strength are chosen by leave-one-combination-out accuracy on the training targets, so on
    training data alone for the generalisation the held-out split asks; among choices within LEFT_OUT_SLACK of
    the best, the strongest ridge wins, since generated tokens are noisier than the targets it was fit on.
    """

    VIEWS = ("pooled", "deviation", "object")
    STRENGTHS = (0.01, 0.1, 1.0, 10.0)  # ridge lambda, relative to the mean of the kernel's diagonal
    LEFT_OUT_SLACK = 0.01  # left-out accuracy given up for a stronger ridge

    def __init__(self, targets: torch.Tensor, labels: dict[str, Sequence[str]]):
        """targets (B, N, D) with labels {attribute: one value per row}."""
        for name, values in labels.items():
            if len(values) != len(targets):
                raise ValueError(f"attribute {name!r} has {len(values)} labels for {len(targets)} targets")
        self.mean_target = targets.float().mean(0)  # (N, D)
        views = {view: _view(targets, view, self.mean_target) for view in self.VIEWS}
        self.standardise = {view: (x.mean(0), x.std(0) + 1e-6) for view, x in views.items()}
        features = {view: (x - self.standardise[view][0]) / self.standardise[view][1] for view, x in views.items()}
        combination = [tuple(values[i] for values in labels.values()) for i in range(len(targets))]
        self.classifiers: dict[str, tuple[str, list[str], torch.Tensor, torch.Tensor]] = {}
        self.selection: dict[str, dict] = {}
        for name, values in labels.items():
            classes = sorted(set(values))
            onehot = torch.tensor([[float(v == c) for c in classes] for v in values], dtype=torch.float64)
            scores = {
                (view, strength): _left_out_accuracy(features[view], onehot, combination, strength)
                for view in self.VIEWS
                for strength in self.STRENGTHS
            }
            best = max(scores.values())
            view, strength = max(
                (key for key, score in scores.items() if score >= best - self.LEFT_OUT_SLACK), key=lambda key: key[1]
            )
            x = features[view]
            self.classifiers[name] = (view, classes, x, _ridge_dual(x @ x.T, onehot, strength))
            self.selection[name] = {"view": view, "strength": strength, "left_out_accuracy": scores[(view, strength)]}

    def predict(self, tokens: torch.Tensor) -> dict[str, list[str]]:
        """(B, N, D) -> {attribute: predicted value per row}."""
        result = {}
        for name, (view, classes, train_x, dual) in self.classifiers.items():
            mean, std = self.standardise[view]
            x = (_view(tokens, view, self.mean_target) - mean) / std
            result[name] = [classes[i] for i in (x @ train_x.T @ dual).argmax(dim=1).tolist()]
        return result

    def accuracy(self, tokens: torch.Tensor, labels: dict[str, Sequence[str]]) -> dict[str, float]:
        """{attribute: share of rows whose predicted value is the labelled one}."""
        return {name: report["accuracy"] for name, report in self.report(tokens, labels).items()}

    def report(self, tokens: torch.Tensor, labels: dict[str, Sequence[str]]) -> dict[str, dict]:
        """{attribute: class_report of the values read from `tokens` against `labels`} (per class and confusions)."""
        predicted = self.predict(tokens)
        return {name: class_report(labels[name], predicted[name]) for name in self.classifiers}


def class_report(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """{"accuracy", "per_class": {class: accuracy}, "confusion": {true class: {predicted class: count}}} over rows:
    a pooled accuracy can hide a class that is never right behind one that always is."""
    if len(truth) != len(predicted) or not truth:
        raise ValueError(
            f"need as many predictions as true labels (at least one), got {len(predicted)} and {len(truth)}"
        )
    confusion: dict[str, dict[str, int]] = {}
    for true, guess in zip(truth, predicted):
        row = confusion.setdefault(true, {})
        row[guess] = row.get(guess, 0) + 1
    per_class = {name: row.get(name, 0) / sum(row.values()) for name, row in sorted(confusion.items())}
    accuracy = sum(t == p for t, p in zip(truth, predicted)) / len(truth)
    return {
        "accuracy": accuracy,
        "per_class": per_class,
        "confusion": {name: confusion[name] for name in sorted(confusion)},
    }


def _view(tokens: torch.Tensor, view: str, mean_target: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> float64 features: the mean token (B, D), each token's distance from the mean target (B, N),
    or the distance-weighted mean of the tokens' differences from it (B, D)."""
    tokens = tokens.float()
    if view == "pooled":
        return tokens.mean(1).double()
    difference = tokens - mean_target  # (B, N, D)
    distance = difference.norm(dim=-1)  # (B, N)
    if view == "deviation":
        return distance.double()
    return ((distance[..., None] * difference).sum(1) / distance.sum(1, keepdim=True).clamp_min(1e-12)).double()


def _ridge_dual(kernel: torch.Tensor, onehot: torch.Tensor, strength: float) -> torch.Tensor:
    """Dual ridge coefficients (B, classes): predictions of new rows x are x @ X.T @ coefficients."""
    scale = strength * kernel.diagonal().mean()
    return torch.linalg.solve(kernel + scale * torch.eye(len(kernel), dtype=kernel.dtype), onehot)


def _left_out_accuracy(x: torch.Tensor, onehot: torch.Tensor, groups: list[tuple], strength: float) -> float:
    """Accuracy over rows, each predicted by a ridge classifier fit without its attribute combination."""
    kernel = x @ x.T
    group = [groups.index(g) for g in groups]
    correct = 0
    for g in set(group):
        held = torch.tensor([i for i, value in enumerate(group) if value == g])
        kept = torch.tensor([i for i, value in enumerate(group) if value != g])
        dual = _ridge_dual(kernel[kept][:, kept], onehot[kept], strength)
        correct += (kernel[held][:, kept] @ dual).argmax(1).eq(onehot[held].argmax(1)).sum().item()
    return correct / len(groups)


def alignment_metrics(
    generated: torch.Tensor,
    target: torch.Tensor,
    probe: AttributeProbe | None = None,
    labels: dict[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """Mean and std of cosine, MSE and norm ratio; recall@1/5/10 raw and centred; prompt-specific cosine;
    per-attribute accuracy of `probe` when `labels` of the rows are given. Plain floats."""
    result = {}
    mean = target.float().mean(0)  # the gallery's mean target
    for name, fn in (("cosine", token_cosine), ("mse", token_mse), ("norm_ratio", norm_ratio)):
        values = fn(generated, target)
        result[f"{name}_mean"] = values.mean().item()
        result[f"{name}_std"] = values.std(unbiased=False).item()
    specific = prompt_specific_cosine(generated, target, mean)
    result["prompt_cosine_mean"] = specific.mean().item()
    result.update({f"recall@{k}": v for k, v in retrieval_recall(generated, target).items()})
    result.update({f"centred_recall@{k}": v for k, v in retrieval_recall(generated, target, mean=mean).items()})
    if probe is not None and labels is not None:
        result.update({f"{name}_accuracy": value for name, value in probe.accuracy(generated, labels).items()})
    return result


# The paper's Tables 1 and 2 (PolyannaG/GAP3D, BLIP3o/eval): alignment per token group, and retrieval with two
# (B, D) query embeddings taken from the generated tokens, laid out as CLS, registers, patches.
PAPER_RECALL_KS = (1, 5, 10)


def token_groups(num_special_tokens: int) -> dict[str, slice]:
    """The token groups Table 1 reports apart: the patch grid, the CLS token and the registers (may be empty)."""
    return {"patches": slice(num_special_tokens, None), "cls": slice(0, 1), "registers": slice(1, num_special_tokens)}


def group_alignment(generated: torch.Tensor, target: torch.Tensor, num_special_tokens: int) -> dict[str, dict]:
    """Table 1: per group, mean and std over samples of the per-sample cosine, MSE and norm ratio ||pred|| / ||gt||.
    (B, N, D) x2 -> {group: {"cosine_mean", "cosine_std", "mse_mean", ...}}; a group without tokens is left out."""
    result = {}
    for group, tokens in token_groups(num_special_tokens).items():
        g, t = generated[:, tokens], target[:, tokens]
        if g.shape[1] == 0:
            continue
        result[group] = {}
        for name, fn in (("cosine", token_cosine), ("mse", token_mse), ("norm_ratio", norm_ratio)):
            values = fn(g, t)
            result[group][f"{name}_mean"] = values.mean().item()
            result[group][f"{name}_std"] = values.std(unbiased=False).item()
    return result


def pooled_embedding(tokens: torch.Tensor, num_special_tokens: int) -> torch.Tensor:
    """Table 2's "pooled" embedding: the patch grid averaged, L2-normalised. (B, N, D) -> (B, D)."""
    return F.normalize(tokens[:, num_special_tokens:].float().mean(1), dim=-1)


def summary_embedding(tokens: torch.Tensor) -> torch.Tensor:
    """Table 2's "summary" embedding: the CLS token, L2-normalised. (B, N, D) -> (B, D)."""
    return F.normalize(tokens[:, 0].float(), dim=-1)


def paper_retrieval(generated: torch.Tensor, target: torch.Tensor, num_special_tokens: int) -> dict[str, dict]:
    """Table 2: caption-to-image recall@1/5/10 in percent, the query and gallery embeddings taken the same way from
    the generated and the true tokens. (B, N, D) x2 -> {"pooled": {"R@1", ...}, "summary": {...}}."""
    embeddings = {
        "pooled": lambda tokens: pooled_embedding(tokens, num_special_tokens),
        "summary": summary_embedding,
    }
    return {
        name: {
            f"R@{k}": 100.0 * recall
            for k, recall in retrieval_recall(
                embed(generated)[:, None], embed(target)[:, None], PAPER_RECALL_KS
            ).items()
        }
        for name, embed in embeddings.items()
    }


def paper_tables(generated: torch.Tensor, target: torch.Tensor, num_special_tokens: int) -> dict[str, dict]:
    """{"alignment": Table 1, "retrieval": Table 2} of generated tokens against their true targets (B, N, D)."""
    return {
        "alignment": group_alignment(generated, target, num_special_tokens),
        "retrieval": paper_retrieval(generated, target, num_special_tokens),
    }
