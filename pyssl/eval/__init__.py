"""Evaluation protocols on checkpoints: linear probe, weighted k-NN, few-shot, fine-tuning.
Evaluation reads a checkpoint's ``encoder`` entry only (see :mod:`pyssl.eval.features`)."""

from .features import extract_features, load_encoder
from .fewshot import fewshot_eval
from .knn import knn_accuracy, knn_predict
from .linear import linear_probe

__all__ = ["extract_features", "fewshot_eval", "knn_accuracy", "knn_predict", "linear_probe",
           "load_encoder"]
