"""Fairness evaluation: attribute classifiers, population-level metrics, the report."""

from fairjax.fairness.classifiers import (AttributeClassifier, DeepFaceClassifier, ExactClassifier, Labeling,
                                          image_digest, table_decoder)
from fairjax.fairness.metrics import DEFAULT_CLASSES, Record, evaluate
from fairjax.fairness.report import read_records, write_records, write_report

__all__ = ["AttributeClassifier", "DeepFaceClassifier", "ExactClassifier", "Labeling", "image_digest",
           "table_decoder", "DEFAULT_CLASSES", "Record", "evaluate", "read_records", "write_records", "write_report"]
