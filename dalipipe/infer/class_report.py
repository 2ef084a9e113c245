"""Per-class precision, recall and F1 beside the balanced accuracy (the mean of the recalls): scikit-learn's
classification report, as a table for the terminal and a frame for a CSV. Loads no torch."""

from __future__ import annotations

import numpy as np
import pandas as pd


def class_report(y_true, y_pred, names: list[str]) -> tuple[str, pd.DataFrame]:
    """(the report as text, one row per class: cell_line, precision, recall, f1, support). Every class of
    `names` has a row, predicted or not (a class never predicted has precision 0, not an error)."""
    from sklearn.metrics import classification_report, precision_recall_fscore_support

    labels = list(range(len(names)))
    text = classification_report(y_true, y_pred, labels=labels, target_names=[str(n) for n in names], digits=4,
                                 zero_division=0)
    # By position, not by name: a class may be called "accuracy" or "macro avg", as the report's summary rows.
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    frame = pd.DataFrame({"cell_line": list(names), "precision": np.round(precision, 5), "recall": np.round(recall, 5),
                          "f1": np.round(f1, 5), "support": support.astype(int)})
    return text, frame


def from_confusion(matrix, names: list[str]) -> tuple[str, pd.DataFrame]:
    """class_report of the predictions a confusion matrix (rows: true class, columns: predicted) counts."""
    m = np.asarray(matrix, dtype=np.int64)
    k = len(names)
    y_true = np.repeat(np.arange(k), m.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(k), m[i]) for i in range(k)])
    return class_report(y_true, y_pred, names)
