"""Invariants of the evaluation metrics: FID closed forms, precision/recall extremes, seed spread."""

import math

import numpy as np
import pytest
import torch

from distillpp.metrics import (
    class_consistency,
    evaluate_samples,
    feature_statistics,
    fid_from_features,
    format_mean_std,
    frechet_distance,
    knn_radii,
    mean_std,
    precision_recall,
    summarize,
    RealFeatures,
)


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_identical_features_is_zero():
    f = np.random.default_rng(0).standard_normal((500, 16))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(torch.from_numpy(f).float(), torch.from_numpy(f).float()) < 1e-4


def test_frechet_distance_diagonal_closed_form():
    # Commuting covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_one_dimensional_and_symmetric():
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 20), _random_spd(rng, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    d = 24
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(4)
    d, n = 4, 200_000
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 0.5, 3.0])
    x = rng.standard_normal((n, d)) * np.sqrt(a)
    y = rng.standard_normal((n, d)) * np.sqrt(b) + 1.0
    expected = d * 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.02)
    mu, sigma = feature_statistics(x)
    assert np.allclose(sigma, np.diag(a), atol=0.03)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        fid_from_features(np.zeros(10), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(3))


def test_knn_radii_matches_brute_force():
    x = torch.randn(300, 8, dtype=torch.float64)
    d = torch.cdist(x, x)
    expected = d.sort(dim=1).values[:, 3]
    got = knn_radii(x, k=3, chunk_size=64, dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-9)


def test_precision_recall_identical_and_disjoint():
    real = torch.randn(400, 16)
    pr = precision_recall(real, real.clone(), k=3, chunk_size=128)
    assert pr == {"precision": 1.0, "recall": 1.0}
    far = torch.randn(300, 16) + 100.0
    pr = precision_recall(real, far, k=3, chunk_size=128)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_precision_recall_mode_collapse_keeps_precision_loses_recall():
    real = torch.randn(1000, 2)
    collapsed = real[real[:, 0] > 1.0]  # a subset of the real data: precise, but covers little
    pr = precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0
    assert pr["recall"] < 0.5


def test_class_consistency():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_consistency(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert class_consistency(torch.tensor([0, 1]), torch.tensor([0, 0])) == 0.5


class _Classifier(torch.nn.Module):
    """Features = the flattened image; logits = which half of the pixels is brighter."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def features(self, x):
        return x.flatten(1)[:, :8] * self.scale

    def forward(self, x):
        f = x.flatten(1)
        return torch.stack([f[:, :8].mean(1), f[:, 8:].mean(1)], dim=1)


def test_evaluate_samples_on_the_real_set_itself():
    torch.manual_seed(0)
    images = torch.rand(200, 1, 4, 4) * 2 - 1
    clf = _Classifier()
    labels = clf(images).argmax(1)
    real = RealFeatures.from_images(clf, images, batch_size=64)
    out = evaluate_samples(images, labels, clf, real, k=3, batch_size=64)
    assert out["class_consistency"] == 1.0
    assert out["fid"] == pytest.approx(0.0, abs=1e-4)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["num_samples"] == 200 and out["nonfinite"] == 0
    images[0] = float("nan")
    assert evaluate_samples(images, labels, clf, None)["nonfinite"] == 1


def test_mean_std_and_summary():
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    summary = summarize([{"fid": 1.0, "recall": 0.5}, {"fid": 3.0, "recall": 0.7}])
    assert summary["fid"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert format_mean_std(summary["fid"], 2) == "2.00 ± 1.41"
    assert format_mean_std(None) == "–"
