"""Table 3's metric maths and extractors (gap3d.fidelity, gap3d.inception) against the paper's definitions."""

import numpy as np
import pytest
import scipy.linalg
import torch

from gap3d.fidelity import (
    ClipScorer,
    DinoExtractor,
    clip_score,
    frechet_distance,
    kernel_distance,
    resized_normalised,
)
from gap3d.inception import InceptionV3Features
from miniature.checkpoints.metric_extractors import write_tiny_clip

# torchvision's inception_v3 has 27,161,264 parameters; less its classifier (2,049,000) and auxiliary head (3,326,696)
TORCHVISION_FEATURE_PARAMETERS = 21_785_568


def features(n: int, d: int = 6, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, d))


def reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The authors' Frechet distance: sample covariances, scipy's matrix square root."""
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cx @ cy).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.trace(root))


def reference_kd(x: np.ndarray, y: np.ndarray) -> float:
    """The authors' KD: unbiased MMD^2 with (x.y / d + 1)^3 over the whole sets, x 100."""
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    mmd = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    return 100.0 * float(mmd)


def test_fd_is_the_papers_frechet_distance():
    x, y = features(64), features(64, shift=0.5, seed=1)
    torch.testing.assert_close(frechet_distance(x, y), reference_fd(x, y), rtol=1e-6, atol=1e-8)


def test_kd_is_the_papers_unbiased_polynomial_mmd_times_100():
    x, y = features(40), features(40, shift=0.3, seed=1)
    torch.testing.assert_close(kernel_distance(x, y), reference_kd(x, y), rtol=1e-9, atol=1e-9)


def test_kd_needs_sets_of_one_size():
    with pytest.raises(ValueError, match="two feature sets of one size"):
        kernel_distance(features(10), features(9))


def test_a_set_is_at_distance_zero_from_itself():
    x = features(50)
    assert abs(frechet_distance(x, x)) < 1e-6
    assert kernel_distance(x, x) == pytest.approx(reference_kd(x, x))


def test_clip_score_is_100_times_the_mean_view_cosine_negatives_included():
    assert clip_score([np.array([0.2, 0.4]), np.array([-0.3, -0.1])]) == pytest.approx(100 * (0.3 - 0.2) / 2)


def test_the_inception_network_is_torchvisions_without_its_classifiers():
    model = InceptionV3Features()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_FEATURE_PARAMETERS
    assert model(torch.zeros(2, 3, 299, 299)).shape == (2, 2048)


def test_inception_loads_hub_layout_weights_skipping_the_auxiliary_head(tmp_path):
    from safetensors.torch import save_file

    state = {
        key: torch.randn_like(value) if value.is_floating_point() else value
        for key, value in InceptionV3Features().state_dict().items()
    }
    extra = {"AuxLogits.fc.weight": torch.zeros(1000, 768), "fc.weight": torch.zeros(1000, 2048)}
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"))
    loaded = InceptionV3Features.from_pretrained(str(tmp_path))
    torch.testing.assert_close(
        loaded.state_dict()["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"]
    )


def test_dinov2_features_are_the_cls_after_the_final_norm():
    extractor = DinoExtractor("tiny://dino", image_size=112)
    images = [np.random.default_rng(i).integers(0, 255, (128, 128, 3), dtype=np.uint8) for i in range(2)]
    with torch.no_grad():
        output = extractor.model(pixel_values=resized_normalised(images, 112), output_hidden_states=True)
        expected = extractor.model.layernorm(output.hidden_states[-1])[:, 0]
    torch.testing.assert_close(torch.from_numpy(extractor(images)).float(), expected)


def test_clip_scorer_gives_one_cosine_per_view():
    scorer = ClipScorer("tiny://clip")
    views = [np.full((64, 64, 3), value, np.uint8) for value in (0, 0, 200)]
    cosines = scorer.cosines(views, "a red cube")
    assert cosines.shape == (3,) and np.all(np.abs(cosines) <= 1.0)
    assert cosines[0] == pytest.approx(cosines[1]) and cosines[0] != pytest.approx(cosines[2])


def test_two_builds_of_the_tiny_clip_score_a_caption_alike(tmp_path):
    # The same weights and token ids on every build, so Table 3's CLIP score does not move with the cache.
    scores = []
    for name in ("first", "second"):
        scorer = ClipScorer(str(write_tiny_clip(tmp_path / name)))
        scores.append(scorer.cosines([np.full((32, 32, 3), 90, np.uint8)], "the torus is purple on black"))
    np.testing.assert_array_equal(scores[0], scores[1])
    assert (tmp_path / "first" / "tokenizer.json").read_bytes() == (tmp_path / "second" / "tokenizer.json").read_bytes()
