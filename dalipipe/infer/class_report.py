"""Per-class precision, recall and F1 beside the balanced accuracy (the mean of the recalls): scikit-learn's
classification report, as a table for the terminal and a frame for a CSV. Loads no torch."""

from __future__ import annotations

import numpy as np
import pandas as pd


def class_report(y_true, y_pred, names: list[str]) -> tuple[str, pd.DataFrame]:
    """(the report as text, one row per class: cell_line, precision, recall, f1, support). Every class of
    `names` has a row, predicted or not (a class never predicted has precision 0, not an error)."""
    from sklearn.metrics import classification_report

    labels = list(range(len(names)))
    kw = dict(labels=labels, target_names=[str(n) for n in names], zero_division=0)
    text = classification_report(y_true, y_pred, digits=4, **kw)
    rows = classification_report(y_true, y_pred, output_dict=True, **kw)
    frame = pd.DataFrame([{"cell_line": name, "precision": round(rows[str(name)]["precision"], 5),
                           "recall": round(rows[str(name)]["recall"], 5), "f1": round(rows[str(name)]["f1-score"], 5),
                           "support": int(rows[str(name)]["support"])} for name in names])
    return text, frame


def from_confusion(matrix, names: list[str]) -> tuple[str, pd.DataFrame]:
    """class_report of the predictions a confusion matrix (rows: true class, columns: predicted) counts."""
    m = np.asarray(matrix, dtype=np.int64)
    k = len(names)
    y_true = np.repeat(np.arange(k), m.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(k), m[i]) for i in range(k)])
    return class_report(y_true, y_pred, names)
