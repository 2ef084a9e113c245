"""The checkpoint format (dalipipe-checkpoint-1) stays as it was first written: this release writes the
pinned layout (tests/data/checkpoint_layout.json), and a file laid out so, as older releases wrote it,
loads for predict and for resume."""

from __future__ import annotations

import torch

from dalipipe import checkpoint
from dalipipe.checkpoint import ModelCard, SavedRun
from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.constants import CKPT_LAST
from dalipipe.distributed import World
from dalipipe.infer import predict
from dalipipe.model import build_model
from dalipipe.run import run_dir
from dalipipe.run.train_setup import make_optimizer
from dalipipe.settings import PredictSettings
from tests import checkpoint_layout
from tests.data.make_checkpoint_layout import layouts

CLASSES = ["A-431", "HEK 293", "HeLa", "U-2 OS"]  # small_synth's four


def test_this_release_writes_the_pinned_layout(small_synth, tmp_path):
    assert layouts(small_synth, tmp_path) == checkpoint_layout.pinned()


def pinned_checkpoint(folder, kind: str, values: dict) -> tuple:
    """A last.pt laid out exactly as the pinned layout `kind`, with efficientnet-b1's weights (the weight
    average's distinct from the model's) and a real Adam state; (its path, model weights, average weights)."""
    torch.manual_seed(0)
    model = build_model(len(CLASSES))
    opt = make_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    average = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    cfg = TrainConfig(images_dir="/data/i", labels_csv="/data/y.csv", out_dir=str(folder), epochs=3, ema=0.9,
                      augment=AugmentSpec(image_size=24))
    given = {("format",): checkpoint_layout.pinned()["format"], ("model",): model.state_dict(), ("optimizer",): opt.state_dict(), ("scaler",): {},
             ("ema", "model"): average, ("class_names",): CLASSES, ("mean",): [10.0, 20.0, 30.0],
             ("std",): [1.0, 2.0, 3.0], ("image_size",): 24, ("config",): cfg.to_dict(), **values}
    ck = checkpoint_layout.build(checkpoint_layout.pinned()[kind], given)
    folder.mkdir()
    path = folder / CKPT_LAST
    torch.save(ck, path)
    return path, model.state_dict(), average


def test_a_checkpoint_of_the_pinned_layout_predicts_with_its_weight_average(small_synth, tmp_path):
    path, _, average = pinned_checkpoint(tmp_path / "run", "epoch_end", {("epoch",): 2,
                                                                          ("split", "train_ids"): [3, 4]})
    card = ModelCard.read(path)
    assert card.class_names == tuple(CLASSES) and card.image_size == 24 and card.epoch == 2
    assert card.norm.mean == (10.0, 20.0, 30.0) and card.norm.std == (1.0, 2.0, 3.0)
    assert card.weights.keys() == average.keys() and all(torch.equal(card.weights[k], average[k]) for k in average)
    assert card.split.train_ids == [3, 4]
    (loaded_path, loaded), = predict.load_models([str(path)])  # (a run folder without best.pt is refused)
    assert loaded_path == path and loaded.class_names == card.class_names
    sub = predict.predict(PredictSettings(checkpoints=(str(path),), images_dir=str(small_synth / "images_test"),
                                          out_csv=str(tmp_path / "sub.csv"), loader="torch", device="cpu",
                                          batch_size=32, workers=1))
    assert len(sub) == 60 and set(sub["cell_line"]) <= set(CLASSES)


def test_a_mid_epoch_checkpoint_of_the_pinned_layout_resumes(tmp_path):
    cpu = torch.device("cpu")
    rng = torch.get_rng_state()
    history = [{"epoch": 1, "val_balanced_accuracy": 0.5}]
    path, weights, _ = pinned_checkpoint(tmp_path / "run", "mid_epoch", {
        ("epoch",): 1, ("best_score",): 0.5, ("val_balanced_accuracy",): 0.5, ("history",): history,
        ("partial", "steps"): 4, ("ranks", 0, "rng_cpu"): rng, ("ranks", 0, "seen"): 128,
        ("ranks", 0, "loss_sum"): torch.tensor(9.5), ("ranks", 0, "loader"): {"epoch": 1, "done": 4},
        ("ranks", 0, "loader_key"): checkpoint.loader_key("torch", "mixed", cpu)})
    saved = SavedRun.read(path)
    assert saved.partial_steps == 4 and saved.progress.epochs_done == 1 and saved.progress.history == history
    assert run_dir.resume_point(saved.card) == "resumed at epoch 2, after step 4"
    mine = checkpoint.restore(saved.ranks, partial_steps=saved.partial_steps, key="torch", device=cpu,
                               world=World(), run=str(path.parent))
    assert mine.seen == 128 and float(mine.loss_sum) == 9.5 and mine.loader == {"epoch": 1, "done": 4}
    model = build_model(len(CLASSES))
    model.load_state_dict(saved.model)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    make_optimizer(model, 1e-3, 0.0, cpu, saved.optimizer)
    cfg = run_dir.resume_config(str(path.parent), {}, None, None, None)
    assert cfg.epochs == 3 and cfg.ema == 0.9 and cfg.augment.image_size == 24
    assert checkpoint.load(path)["format"] == checkpoint.FORMAT
