"""Classification metrics with scikit-learn, in the shape the report's JSON contract names."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score


def _num(value) -> float | None:
    """JSON-safe float: NaN (undefined) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def one_vs_rest_auc(y_true: list[str], probs: np.ndarray, classes: list[str], cls: str) -> float:
    """ROC-AUC of one class against the rest; NaN when the class or its complement is absent."""
    positive = np.array([t == cls for t in y_true])
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, probs[:, classes.index(cls)]))


def classification_metrics(y_true: list[str], y_pred: list[str], probs: np.ndarray, classes: list[str]) -> dict:
    """accuracy, per_class {precision, recall, f1, support, auc}, macro/weighted averages, confusion matrix."""
    classes = list(classes)
    if not y_true:
        nan_avg = {"precision": None, "recall": None, "f1": None}
        return {
            "accuracy": None,
            "per_class": {c: {"precision": None, "recall": None, "f1": None, "support": 0, "auc": None} for c in classes},
            "macro_avg": nan_avg, "weighted_avg": dict(nan_avg),
            "confusion_matrix": {"labels": classes, "matrix": [[0] * len(classes) for _ in classes]},
        }
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=np.nan)
    per_class = {
        c: {
            "precision": _num(p[i]), "recall": _num(r[i]), "f1": _num(f[i]), "support": int(s[i]),
            "auc": _num(one_vs_rest_auc(y_true, probs, classes, c)),
        }
        for i, c in enumerate(classes)
    }
    averages = {}
    for avg in ("macro", "weighted"):
        # Classes absent from both truth and prediction would be NaN; average over the present ones.
        present = [c for c in classes if c in y_true or c in y_pred]
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=avg, zero_division=0)
        averages[f"{avg}_avg"] = {"precision": _num(ap), "recall": _num(ar), "f1": _num(af)}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": per_class,
        **averages,
        "confusion_matrix": {
            "labels": classes,
            "matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        },
    }
