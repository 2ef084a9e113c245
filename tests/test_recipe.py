"""The pieces beyond the reference recipe, each against a value computed by hand: the reference
initialization, the learning-rate schedule, the weight average, class weights, label smoothing and the
k-fold split."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalipipe.config import TrainConfig
from dalipipe.data.split import kfold_split
from dalipipe.ema import WeightAverage, decay_at
from dalipipe.errors import DataError
from dalipipe.model import build_model, init_like_reference
from dalipipe.run.recipe import Recipe, Schedule, balanced_class_weights


def block_stds(model: nn.Module, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """The std of the stem's output and of every block's output, in eval mode, and the logits."""
    stds = []
    hooks = [model._bn0.register_forward_hook(lambda m, i, o: stds.append(o.std().item()))]
    hooks += [b.register_forward_hook(lambda m, i, o: stds.append(o.std().item())) for b in model._blocks]
    with torch.no_grad():
        logits = model.eval()(x)
    for h in hooks:
        h.remove()
    return stds, logits


def test_a_fresh_model_keeps_its_activations_and_tells_inputs_apart():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    stds, logits = block_stds(build_model(3), x)
    ratios = [b / a for a, b in zip(stds, stds[1:])]
    # Measured: every block keeps at least 18% of its input's scale (stem 0.42, last block 4e-5) and the
    # logits differ between the inputs; with PyTorch's default init a block kept as little as 2% (last
    # block 2e-12) and the logits were the same for every input (std over the batch exactly 0).
    assert min(ratios) > 0.1, [f"{r:.3f}" for r in ratios]
    assert logits.std(0).min() > 0

    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    default = EfficientNet.from_name("efficientnet-b1", num_classes=3)  # the same model without our init
    stds, logits = block_stds(default, x)
    assert min(b / a for a, b in zip(stds, stds[1:])) < 0.05
    assert logits.std(0).max() < 1e-6


def test_the_reference_init_draws_the_reference_distributions():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 64, 3, bias=True), nn.Conv2d(64, 64, 5, groups=64), nn.BatchNorm2d(64),
                          nn.Flatten(), nn.Linear(64, 9))
    init_like_reference(model)
    conv, depthwise, bn, fc = model[0], model[1], model[2], model[4]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (3 * 3 * 64)), rel=0.05)
    assert depthwise.weight.std().item() == pytest.approx(math.sqrt(2 / (5 * 5)), rel=0.1)  # fan_out k*k
    assert torch.equal(conv.bias, torch.zeros(64)) and torch.equal(fc.bias, torch.zeros(9))
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
    assert fc.weight.abs().max().item() <= 1 / 8 and fc.weight.abs().max().item() > 0.12  # U(+-1/sqrt(64))


def test_schedule_rates_at_given_steps():
    cosine = Schedule("cosine", base=1e-3, warmup_steps=10, total_steps=110)
    assert cosine.lr(0) == pytest.approx(1e-4)  # warm-up: step 0 already trains, at base/warmup_steps
    assert cosine.lr(4) == pytest.approx(5e-4)
    assert cosine.lr(9) == pytest.approx(1e-3)
    assert cosine.lr(10) == pytest.approx(1e-3)  # the cosine starts at the top
    assert cosine.lr(60) == pytest.approx(5e-4)  # half way down
    assert cosine.lr(109) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert cosine.lr(109) > 0
    constant = Schedule("constant", base=1e-3, warmup_steps=0, total_steps=110)
    assert {constant.lr(s) for s in range(110)} == {1e-3}  # the reference recipe, unchanged
    assert cosine.epoch_mean(1, 10) == pytest.approx(np.mean([cosine.lr(s) for s in range(10, 20)]))


def test_schedule_of_a_config_counts_warmup_in_steps(tmp_path):
    cfg = TrainConfig(images_dir="i", labels_csv="l", out_dir="o", epochs=4, schedule="cosine", warmup_epochs=0.5,
                      lr=2e-3)
    s = Schedule.of(cfg, steps_per_epoch=10)
    assert (s.kind, s.base, s.warmup_steps, s.total_steps) == ("cosine", 2e-3, 5, 40)


def test_ema_equals_the_average_computed_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    ema = WeightAverage(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    by_hand = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(6):
        x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 2, (5,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update()
        d = decay_at(0.9, t)
        for k, w in model.state_dict().items():
            by_hand[k] = d * by_hand[k] + (1 - d) * w if w.is_floating_point() else w.clone()
    assert ema.updates == 6
    assert decay_at(0.9, 0) == 0.0 and decay_at(0.9, 5) == pytest.approx(1 - 6 ** (-2 / 3))
    assert decay_at(0.9, 10_000) == 0.9  # warmed up: the decay asked for
    got = ema.module.state_dict()
    for k, v in by_hand.items():
        assert torch.allclose(got[k].float(), v.float(), rtol=1e-6, atol=1e-7), k
    assert got["1.num_batches_tracked"].item() == 6  # integer entries are copied
    assert not torch.allclose(got["0.weight"], model[0].weight)  # an average, not a copy
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_round_trips():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, 0.99)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
    other = WeightAverage(nn.Linear(3, 2), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and torch.equal(other.module.weight, ema.module.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    other._floats = (other._floats[0], list(model.state_dict().values()))  # follow the same model
    ema.update()
    other.update()
    assert torch.equal(other.module.weight, ema.module.weight)


def test_balanced_class_weights_and_the_loss_that_uses_them():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = balanced_class_weights(y, 3)
    assert np.allclose(w, [10 / 18, 10 / 9, 10 / 3])  # n / (k * count): each class adds the same total
    assert np.allclose(np.bincount(y, weights=w[y]), 10 / 3)
    cfg = TrainConfig(images_dir="i", labels_csv="l", out_dir="o", class_weights="balanced", label_smoothing=0.1)
    recipe = Recipe(cfg, nn.Linear(2, 3), y_train=y, n_classes=3, steps_per_epoch=1, device=torch.device("cpu"))
    logits, target = torch.randn(10, 3), torch.from_numpy(y)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(w, dtype=torch.float32), label_smoothing=0.1)
    assert torch.allclose(recipe.loss(logits, target), expected)
    assert not torch.allclose(recipe.loss(logits, target), F.cross_entropy(logits, target))
    assert recipe.class_weights.tolist() == pytest.approx(w.tolist())  # what the checkpoint saves
    plain = Recipe(TrainConfig(images_dir="i", labels_csv="l", out_dir="o"), nn.Linear(2, 3), y_train=y,
                   n_classes=3, steps_per_epoch=1,
                   device=torch.device("cpu"))
    assert torch.equal(plain.loss(logits, target), F.cross_entropy(logits, target))
    assert plain.ema is None and plain.class_weights is None


def _labelled(counts: dict[str, int]) -> pd.DataFrame:
    names = [n for n, c in counts.items() for _ in range(c)]
    order = np.random.default_rng(0).permutation(len(names))
    frame = pd.DataFrame({"file_id": np.arange(1, len(names) + 1) * 3, "cell_line": np.array(names)[order]})
    frame["y"] = frame["cell_line"].map({n: i for i, n in enumerate(sorted(counts))})
    return frame


def test_folds_are_disjoint_stratified_and_cover_the_labelled_set():
    index = _labelled({"RT4": 41, "A549": 12, "HeLa": 20})
    vals = [kfold_split(index, 5, i, seed=7) for i in range(1, 6)]
    val_ids = [set(v.file_id) for _, v in vals]
    assert set().union(*val_ids) == set(index.file_id)
    assert sum(len(v) for v in val_ids) == len(index)  # disjoint
    for train, val in vals:
        assert set(train.file_id) == set(index.file_id) - set(val.file_id)
        assert list(val.file_id) == sorted(val.file_id) and list(train.file_id) == sorted(train.file_id)
    for name, count in {"RT4": 41, "A549": 12, "HeLa": 20}.items():
        per_fold = [int((v.cell_line == name).sum()) for _, v in vals]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count, (name, per_fold)
    # The same folds for the same data and seed, whatever the rows' order; another seed, other folds.
    shuffled = index.sample(frac=1, random_state=3)
    assert list(kfold_split(shuffled, 5, 2, seed=7)[1].file_id) == list(vals[1][1].file_id)
    assert list(kfold_split(index, 5, 2, seed=8)[1].file_id) != list(vals[1][1].file_id)


def test_a_class_smaller_than_the_folds_is_refused_by_name():
    index = _labelled({"RT4": 30, "A549": 3})
    with pytest.raises(DataError, match=r"--folds 4: every class needs at least 4 samples.*'A549' \(3\)"):
        kfold_split(index, 4, 1, seed=0)


@pytest.mark.parametrize("options, message", [
    (dict(folds=5), "--folds K and --fold I go together"),
    (dict(folds=3, fold=4), "--fold must be between 1 and --folds (3), got 4"),
    (dict(folds=1, fold=1), "--folds must be at least 2"),
    (dict(ema=1.0), "--ema must be between 0 and 1"),
    (dict(schedule="step"), "--schedule must be one of constant, cosine"),
    (dict(warmup_epochs=30), "--warmup-epochs must be at least 0 and less than --epochs (30)"),
    (dict(label_smoothing=1.0), "--label-smoothing must be in [0, 1)"),
    (dict(class_weights="inverse"), "--class-weights must be one of none, balanced"),
])
def test_bad_recipe_options_are_named(options, message):
    with pytest.raises(DataError) as e:
        TrainConfig(images_dir="i", labels_csv="l", out_dir="o", **options)
    assert message in str(e.value)


@pytest.mark.parametrize("start", ["scratch", "weights", "pretrained"])
def test_a_model_from_scratch_takes_batchnorms_statistics_from_the_first_batch(start):
    """The running statistics become the first batch's own (momentum 1 for one pass, restored after); a model
    that starts from weights keeps the statistics it came with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    images = torch.randn(8, 3, 5, 5) * 3 + 2
    given = {"weights": {"weights": "w.pt"}, "pretrained": {"pretrained": True}}.get(start, {})
    cfg = TrainConfig(images_dir="i", labels_csv="l", out_dir="o", **given)
    model.eval()
    Recipe(cfg, model, y_train=np.array([0, 1]), n_classes=2, steps_per_epoch=1,
           device=torch.device("cpu")).first_batch(images)
    bn = model[1]
    with torch.no_grad():
        x = model[0](images)
    if start == "scratch":
        assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var, x.var((0, 2, 3)), rtol=1e-4)
    else:
        assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))
    assert bn.momentum == 0.1 and not model.training and all(p.grad is None for p in model.parameters())
