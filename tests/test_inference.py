"""Scoring: an evaluation loader's samples once each, whatever the shards repeat; each class's precision, recall
and F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalipipe.infer.class_report import class_report, from_confusion
from dalipipe.infer.inference import scores_by_position

CPU = torch.device("cpu")


class ValueLogits(torch.nn.Module):
    """Logits that carry the input's value: (x, -x)."""

    def forward(self, images):
        v = images.mean((1, 2, 3))[:, None]
        return torch.cat([v, -v], 1)


def test_padded_shards_are_scored_once_per_sample_in_position_order():
    # As a DistributedSampler pads its last shard: positions 0 and 3 handed out twice.
    batches = [(torch.full((2, 3, 4, 4), float(p)).index_fill(0, torch.tensor([1]), float(q)), torch.tensor([p, q]))
               for p, q in ((3, 1), (0, 2), (3, 0))]
    pos, logits = scores_by_position(ValueLogits(), batches, device=CPU)
    assert pos.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(logits[:, 0], [0.0, 1.0, 2.0, 3.0])


def test_each_class_gets_its_precision_recall_and_f1_and_their_mean_recall_is_the_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    names = ["A549", "HeLa", "RT4"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 2, 2, 2, 0])  # HeLa: 2 of 2 found, 3 predicted
    text, rows = class_report(y_true, y_pred, names)
    assert rows.cell_line.tolist() == names and rows.support.tolist() == [4, 2, 4]
    assert rows.recall.tolist() == [0.5, 1.0, 0.75]
    assert rows.precision.tolist() == [pytest.approx(2 / 3, abs=1e-5), pytest.approx(2 / 3, abs=1e-5), 0.75]
    assert rows.f1[1] == pytest.approx(0.8, abs=1e-5)  # 2pr / (p + r) = 2 (2/3)(1) / (5/3)
    assert rows.recall.mean() == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert all(name in text for name in names) and "macro avg" in text
    # The same report from the counts alone (what a checkpoint keeps of its best epoch).
    again, rows_again = from_confusion(confusion_matrix(y_true, y_pred, labels=[0, 1, 2]), names)
    assert again == text and rows_again.equals(rows)


def test_a_class_never_predicted_has_precision_zero_not_an_error():
    _, rows = class_report(np.array([0, 1, 2]), np.array([0, 0, 0]), ["a", "b", "c"])
    assert rows.precision.tolist()[1:] == [0.0, 0.0] and rows.recall.tolist() == [1.0, 0.0, 0.0]


def test_classes_named_like_the_reports_summary_rows_keep_their_own_figures():
    _, rows = class_report(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["accuracy", "macro avg"])
    assert rows.cell_line.tolist() == ["accuracy", "macro avg"] and rows.recall.tolist() == [0.5, 1.0]
