"""Evaluation of generated images: FID, improved precision/recall, class consistency, seed spread,
and the sampling harness the demo and benchmarks share."""

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
from .generate import (
    TEACHER_OF,
    Method,
    ModelCache,
    generate,
    get_zoo,
    initial_noise,
    load_test_set,
    sample_forwards,
)
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
    "TEACHER_OF",
    "Method",
    "ModelCache",
    "get_zoo",
    "load_test_set",
    "initial_noise",
    "generate",
    "sample_forwards",
]
