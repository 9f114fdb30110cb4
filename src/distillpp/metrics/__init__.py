"""Evaluation of generated images: FID, improved precision/recall, class consistency, seed spread, and
pixel-level checks (high-frequency energy ratio, pixel Fréchet distance).

Model-agnostic: features come from whatever extractor the caller passes. The zoo's sampling
harness lives in :mod:`distillpp.zoo.harness`."""

from .evaluate import (
    RealFeatures,
    class_consistency,
    classifier_outputs,
    evaluate_samples,
    format_mean_std,
    mean_std,
    summarize,
)
from .fid import feature_statistics, fid_from_features, frechet_distance
from .pixels import PixelReference, center_crop, high_frequency_energy, pixel_features, pixel_metrics
from .precision_recall import knn_radii, manifold_coverage, precision_recall

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "knn_radii",
    "manifold_coverage",
    "precision_recall",
    "classifier_outputs",
    "class_consistency",
    "RealFeatures",
    "evaluate_samples",
    "mean_std",
    "summarize",
    "format_mean_std",
    "center_crop",
    "high_frequency_energy",
    "pixel_features",
    "PixelReference",
    "pixel_metrics",
]
