"""Alignment metrics between generated and true DINOv2 tokens, all on (B, N, D) tensors."""

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


def retrieval_recall(queries: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Text->image recall@k: query i (generated from caption i) should rank target i first.

    Similarity is the cosine of the token-flattened embeddings. (B, N, D) x2 -> {k: recall in [0, 1]}.
    """
    q = F.normalize(queries.float().flatten(1), dim=-1)
    g = F.normalize(targets.float().flatten(1), dim=-1)
    similarity = q @ g.T  # (B, B)
    correct = similarity.diagonal()[:, None]
    # Rank = number of targets scored strictly higher than the true one; ties count in the query's favour.
    rank = (similarity > correct).sum(dim=1)
    return {k: (rank < k).float().mean().item() for k in ks}


def alignment_metrics(generated: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean and std of cosine, MSE and norm ratio, plus recall@1/5/10, as plain floats."""
    result = {}
    for name, fn in (("cosine", token_cosine), ("mse", token_mse), ("norm_ratio", norm_ratio)):
        values = fn(generated, target)
        result[f"{name}_mean"] = values.mean().item()
        result[f"{name}_std"] = values.std(unbiased=False).item()
    result.update({f"recall@{k}": v for k, v in retrieval_recall(generated, target).items()})
    return result
