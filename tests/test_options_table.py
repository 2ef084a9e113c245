"""The options table (options.py) is the one declaration of every option: the CLI, the checks, the resume
rules and the docs' lists (tests/test_docs.py) all follow it, and building the CLI loads nothing heavy."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from dalipipe import cli, options
from dalipipe.config import RESUME_MAY_CHANGE, TRAIN_OPTIONS, AugmentSpec, TrainConfig
from dalipipe.errors import DataError
from dalipipe.run import run_dir
from dalipipe.settings import CheckSettings, LoaderSpeedSettings, PredictSettings, PreviewSettings, SynthSpec
from tests import processes
from tests.test_resume_options import saved_run

HELP_TIMEOUT_S = 60  # the command of the help test: under 2 s here (2026-12-06, 2-core CPU)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_speed.py"
COMMANDS = {"train": TrainConfig, "predict": PredictSettings, "preview": PreviewSettings, "check": CheckSettings,
            "synth": SynthSpec}
# Every settings whose options the table checks: the commands', and the loader benchmark's.
CHECKED = dict(COMMANDS, loader_speed=LoaderSpeedSettings)


@pytest.mark.parametrize("command, settings", COMMANDS.items())
def test_every_option_of_the_table_is_a_click_option_of_its_command(command, settings):
    params = {p.name: p for p in cli.cli.commands[command].params}
    for o in options.table(settings):
        p = params[o.name]
        assert o.flag in p.opts, (o.name, p.opts)
        if o.on_off:
            assert p.secondary_opts == [f"--no-{o.flag[2:]}"], o.name
        if o.choices:
            assert tuple(p.type.choices) == o.choices, o.name
        # train's options are "not given" unless given (a resume keeps the run's); the others' defaults are
        # the settings' own
        if o.spec.required:
            assert p.required, o.name
        else:
            assert p.default == (None if command == "train" else o.default), o.name
        assert o.spec.help in p.help and f"[default: {o.default_shown()}]" in p.help or o.spec.switch or o.spec.required


def alternative(o: options.Option):
    """A valid value of the option other than its default."""
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.type is bool:
        return not o.default
    return {"lr": 0.01, "val_fraction": 0.25, "weight_decay": 0.001, "ema": 0.99, "warmup_epochs": 1.0,
            "label_smoothing": 0.1, "image_size": 32, "subset": 10}.get(o.name, 3)


FIXED = [o for o in TRAIN_OPTIONS if o.name not in RESUME_MAY_CHANGE and o.spec.path is None
         and o.name not in ("folds", "fold", "pretrained")]  # pairs and downloads: below


@pytest.mark.parametrize("o", FIXED, ids=[o.name for o in FIXED])
def test_a_resume_refuses_a_new_value_of_every_option_the_table_keeps_fixed(tmp_path, o):
    run = Path(saved_run(tmp_path / "run"))
    cfg = TrainConfig(images_dir="/data/i", labels_csv="/data/y.csv", out_dir=str(run))
    with pytest.raises(DataError, match=f"{re.escape(o.spelling)} is .* in the run, got"):
        run_dir.resume_config(str(run), {o.name: alternative(o)}, None, None, None)
    # the run's own value again is accepted
    own = cfg.augment.image_size if o.name == "image_size" else getattr(cfg, o.name)
    assert run_dir.resume_config(str(run), {o.name: own}, None, None, None) == dataclasses.replace(
        cfg, out_dir=str(run.resolve()))


def test_the_resume_rule_covers_the_fold_pair_and_the_weights(tmp_path):
    run = saved_run(tmp_path / "run", folds=5, fold=2)
    with pytest.raises(DataError, match="--fold is 2 in the run, got 3"):
        run_dir.resume_config(str(run), {"folds": 5, "fold": 3}, None, None, None)
    with pytest.raises(DataError, match="--weights is not set in the run"):
        run_dir.resume_config(str(run), {"weights": str(tmp_path / "w.pth")}, None, None, None)


def test_every_bound_of_the_table_is_refused_in_one_line_naming_the_option():
    bounded = [o for o in TRAIN_OPTIONS if o.spec.low is not None]
    assert len(bounded) >= 10  # the table carries the bounds (not a hand-written check per option)
    for o in bounded:
        below = o.type(o.spec.low if o.spec.low_open else o.spec.low - 1)
        kw = {"augment": AugmentSpec(image_size=below)} if o.path == ("augment", "image_size") else {o.name: below}
        with pytest.raises(DataError, match=f"^{re.escape(o.flag)} must be"):
            TrainConfig("", "", "", **kw)


def test_building_the_cli_and_its_help_loads_no_torch_and_check_and_synth_need_none(tmp_path):
    """In a process of its own (pytest has torch loaded): the help of every command, then synth, check and
    score over what synth made, and then none of torch, DALI or scikit-learn is loaded, except scikit-learn
    by check's split and score's balanced accuracy, which use it."""
    code = f"""
import sys
from click.testing import CliRunner
from dalipipe.cli import cli
heavy = ("torch", "nvidia.dali", "sklearn")
for command in ({', '.join(repr(c) for c in COMMANDS)}):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0, r.output
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
r = CliRunner().invoke(cli, ["synth", {str(tmp_path / 'd')!r}, "--n-train", "12", "--n-test", "2", "--classes", "2",
                             "--size", "16"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(cli, ["check", {str(tmp_path / 'd' / 'images_train')!r}, "--no-cache"])
assert r.exit_code == 0 and "no problems found" in r.output, r.output
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
r = CliRunner().invoke(cli, ["check", {str(tmp_path / 'd' / 'images_train')!r}, {str(tmp_path / 'd' / 'y_train.csv')!r},
                             "--no-cache"])
assert r.exit_code == 0 and "a run would train on" in r.output, r.output
assert not [m for m in ("torch", "nvidia.dali") if m in sys.modules]
r = CliRunner().invoke(cli, ["score", {str(tmp_path / 'd' / 'y_train.csv')!r}, {str(tmp_path / 'd' / 'y_train.csv')!r}])
assert r.exit_code == 0 and "balanced accuracy 1.0000" in r.output, r.output
assert not [m for m in ("torch", "nvidia.dali") if m in sys.modules]
print("light")
"""
    r = processes.run([sys.executable, "-c", code], timeout=HELP_TIMEOUT_S)
    assert r.returncode == 0 and "light" in r.stdout, r.stderr[-3000:]


# The arguments each command's settings need besides its options.
POSITIONAL = {TrainConfig: ("", "", ""), PredictSettings: (("run",), "images"), PreviewSettings: ("images", "y.csv"),
              CheckSettings: ("images",), SynthSpec: (), LoaderSpeedSettings: ()}


def _made_with(settings, o: options.Option, value):
    """The settings made with this one option set (the model input's side lives in the augmentation)."""
    kw = {"augment": AugmentSpec(image_size=value)} if o.path == ("augment", "image_size") else {o.name: value}
    return settings(*POSITIONAL[settings], **kw)


def _outside(o: options.Option) -> list:
    """Values just past each of the option's bounds, and a choice it does not have."""
    s, step = o.spec, (1 if o.type is int else 1e-6)
    out = []
    if s.low is not None:
        out.append(o.type(s.low if s.low_open else s.low - step))
    if s.high is not None:
        out.append(o.type(s.high if s.high_open else s.high + step))
    if o.choices:
        out.append("nonsense")
    return out


@pytest.mark.parametrize("command, settings", CHECKED.items())
def test_each_commands_settings_check_every_bound_and_choice_of_the_table_themselves(command, settings):
    """Made directly (not through the CLI, whose other layers might refuse the value first), each command's
    settings refuse a value past any bound, or outside the choices, with the table's own message, and take the
    bound itself where it is closed."""
    checked = 0
    for o in options.table(settings):
        for value in _outside(o):
            with pytest.raises(DataError) as e:
                _made_with(settings, o, value)
            assert str(e.value) == o.bound_error(value), (command, o.name, value)
            checked += 1
        for bound, is_open in ((o.spec.low, o.spec.low_open), (o.spec.high, o.spec.high_open)):
            if bound is not None and not is_open:
                try:
                    _made_with(settings, o, o.type(bound))
                except DataError as e:  # another rule may refuse the whole, never this option's bound
                    assert not str(e).startswith(f"{o.flag} must be"), (command, o.name, str(e))
    assert checked >= (10 if settings is TrainConfig else 2), command


# Per command, a value past one bound of its table, given on its command line, that no other layer checks: click
# reads a number, and no later code repeats the bound. Only the command's own table check can refuse it; without
# that check the command would go on (to a missing folder or checkpoint here: the error is another).
ON_THE_COMMAND_LINE = [("train", "batch_size", "1"), ("predict", "batch_size", "0"), ("preview", "n", "1"),
                       ("check", "val_fraction", "1"), ("synth", "n_classes", "1")]


@pytest.mark.parametrize("command, name, value", ON_THE_COMMAND_LINE, ids=[c for c, _, _ in ON_THE_COMMAND_LINE])
def test_each_commands_table_check_refuses_a_value_given_on_its_command_line(tmp_path, command, name, value):
    from click.testing import CliRunner

    o = options.find(COMMANDS[command], name)
    where = {"train": ["images", "y.csv", "--out", "run"], "predict": [".", "images", "--out", "s.csv"],
             "preview": ["images", "y.csv", "--out", "p.png"], "check": ["images"],
             # (a small set, should the check let it through)
             "synth": ["s", "--n-train", "4", "--n-test", "0", "--size", "16"]}[command]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(cli.cli, [command, *where, o.flag, value])
        assert r.exit_code == 2 and r.output.strip() == f"Error: {o.bound_error(o.type(value))}", r.output
        assert list(Path().iterdir()) == []  # no run folder, picture, predictions or data set


def test_the_loader_benchmark_refuses_through_the_table_a_value_no_other_layer_checks(tmp_path):
    """benchmarks/loader_speed.py takes train's --batch-size (its rows build training loaders): a batch of
    one is the table's to refuse, in one line, before the benchmark reads its data."""
    o = options.find(LoaderSpeedSettings, "batch_size")
    r = processes.run([sys.executable, str(BENCH), "--data", str(tmp_path / "missing"), "--batch-size", "1"],
                      timeout=HELP_TIMEOUT_S)
    assert r.returncode == 1 and r.stderr.strip() == f"Error: {o.bound_error(1)}", r.stderr[-2000:]


def test_a_resume_refusal_says_the_values_as_a_user_writes_them(tmp_path):
    run = str(saved_run(tmp_path / "run"))
    for given, said in [({"ema": 0.99}, "--ema is not set in the run, got 0.99"),
                        ({"tta_val": True}, "--[no-]tta-val is off in the run, got on"),
                        ({"warmup_epochs": 1.0}, "--warmup-epochs is 0 in the run, got 1;")]:
        with pytest.raises(DataError, match=re.escape(said)):
            run_dir.resume_config(run, given, None, None, None)
