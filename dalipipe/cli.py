"""The command line: parse, call, report. Bad input ends in a one-line `Error:` and exit status 2."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from dalipipe import options
from dalipipe.config import TrainConfig, may_change_text
from dalipipe.constants import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_TIME_LIMIT, EXIT_USER
from dalipipe.errors import DataError
from dalipipe.settings import CheckSettings, PredictSettings, PreviewSettings, SynthSpec

# Only light modules above: building the commands and their help must not load torch, DALI or scikit-learn
# (each command imports what it uses when it runs).


def options_of(cls: type, given_only: bool = False):
    """The click options of a settings class, from its options table (options.py). given_only: every option
    defaults to None (not given), so that `train --resume` can tell what the command line said; the help
    then shows the settings' default."""
    def decorate(f):
        for o in reversed(options.table(cls)):
            f = _click_option(o, given_only)(f)
        return f
    return decorate


def _click_option(o: options.Option, given_only: bool):
    kw = dict(help=f"{o.spec.help} [default: {o.default_shown()}]", metavar=o.spec.metavar,
              default=None if given_only else o.default)
    if o.spec.required:  # (no default at all: click takes even default=None as a value given)
        kw = dict(help=o.spec.help, metavar=o.spec.metavar, required=True)
    if o.spec.switch:
        return click.option(o.flag, o.name, is_flag=True, default=False, help=o.spec.help)
    if o.on_off:
        return click.option(f"{o.flag}/--no-{o.flag[2:]}", o.name, **kw)
    kind = (click.Choice(o.choices) if o.choices else o.type if o.spec.path is None
            else click.Path(file_okay=False) if o.spec.path == "folder"
            else click.Path(exists=o.spec.path == "existing file", dir_okay=False))
    return click.option(o.flag, o.name, type=kind, **kw)


# ctx.meta key: a function that says, when Ctrl-C stops the command, what is on disk and what to do next.
ON_INTERRUPT = "dalipipe.on_interrupt"
# Set to 1 by a script that runs dalipipe and says itself what comes after a Ctrl-C (make demo): the
# command then stops with exit 130 and no line of its own, which would point the user elsewhere.
NO_INTERRUPT_HINT = "DALIPIPE_NO_INTERRUPT_HINT"


def on_interrupt(text) -> None:
    """Set what Ctrl-C reports from here on (text: a string, or a function called at that moment)."""
    click.get_current_context().meta[ON_INTERRUPT] = text if callable(text) else (lambda: text)


class UserError(click.ClickException):
    exit_code = EXIT_USER


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler's notice before a pre-emption): the command stops as
    Ctrl-C stops it (pending writes finished, a line saying what is on disk), with exit status 143."""


def _on_sigterm(signum, frame) -> None:
    # Once: a second SIGTERM (a group signalled twice, a wrapper passing it on) must not break into the
    # stopping itself, whose pending writes finish first; SIGKILL still ends the process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DataError as e:
            # One line, whatever it quotes: a class name or a path may hold a line break.
            raise UserError(str(e).replace("\r", "\\r").replace("\n", "\\n")) from None
        except KeyboardInterrupt as e:
            # What is true at this moment, as the command in progress knows it (ctx.meta is shared with it).
            hint = ctx.meta.get(ON_INTERRUPT)
            terminated = isinstance(e, Terminated)
            if os.environ.get(NO_INTERRUPT_HINT) != "1":
                click.echo(("\nstopped by SIGTERM" if terminated else "\ninterrupted") + (f": {hint()}" if hint else ""),
                           err=True)
            ctx.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:
            # Not the user's input: a bug. Keep the traceback (it is what a report needs) and say so.
            traceback.print_exc()
            click.echo(f"dalipipe internal error ({type(e).__name__}); this is a bug in dalipipe, not in your "
                       f"data: please report it with the traceback above", err=True)
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=_Group)
@click.version_option(package_name="dalipipe")
def cli() -> None:
    """Train and apply an efficientnet-b1 cell-line classifier on three-channel microscopy PNGs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # dalipipe's INFO lines are for the user; matplotlib's (such as building its font cache on a first run,
    # which would print mid-epoch) are not.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@options_of(SynthSpec)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def synth(out_dir, force, **opts):
    """Write a synthetic dataset in the challenge's layout to OUT_DIR.

    At any size an image shows one cell scaled to the image; the real 512 px Human Protein Atlas images show
    several cells per field."""
    from dalipipe.data.synthetic import generate

    spec = SynthSpec(**opts)
    # The set is written beside OUT_DIR and renamed into place once complete: a stop leaves OUT_DIR as it was.
    on_interrupt(f"nothing was written to {out_dir}; run the command again")
    path = generate(out_dir, spec, force=force)
    click.echo(f"wrote {spec.n_train} training and {spec.n_test} test samples ({spec.n_classes} classes, "
               f"{spec.image_size}px) to {path}")


@cli.command()
@click.argument("images_dir", required=False, type=click.Path())
@click.argument("labels_csv", required=False, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run directory for checkpoints, metrics, plots.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this directory with its own settings. "
                   f"{may_change_text().replace('`', '')} may change; other options may be given only with the "
                   "run's values; "
                   "IMAGES_DIR and LABELS_CSV may point at moved data.")
@options_of(TrainConfig, given_only=True)
def train(images_dir, labels_csv, out_dir, resume_dir, **opts):
    """Train on IMAGES_DIR with LABELS_CSV (file_id,cell_line) into --out RUN_DIR."""
    from dalipipe.run import run_dir
    from dalipipe.run.train import train as run

    # Every option defaults to None (not given): a new run takes TrainConfig's default, a resume the run's.
    given = {k: v for k, v in opts.items() if v is not None}
    if resume_dir:
        cfg = run_dir.resume_config(resume_dir, given, images_dir, labels_csv, out_dir)
    else:
        if not (images_dir and labels_csv and out_dir):
            raise click.UsageError("IMAGES_DIR, LABELS_CSV and --out RUN_DIR are required (or --resume RUN_DIR)")
        cfg = run_dir.new_config(images_dir, labels_csv, out_dir, given)
    on_interrupt(lambda: run_dir.interrupt_hint(Path(cfg.out_dir)))
    result = run(cfg, resume=bool(resume_dir))
    if result.epochs and result.main:  # under torchrun: rank 0 speaks
        # as the epoch lines round it (from metrics.jsonl's 5 decimals), so that the two never differ in the last digit
        best = next((row for row in result.history if row["epoch"] == result.best_epoch), None) or max(
            result.history, key=lambda row: row["val_balanced_accuracy"])  # (a run of an older dalipipe)
        click.echo(f"best validation balanced accuracy {best['val_balanced_accuracy']:.4f} (epoch {best['epoch']}); "
                   f"run in {cfg.out_dir}")
        if result.best_report:
            click.echo(f"epoch {best['epoch']} per class (validation):\n{result.best_report}")
    if result.stopped_early:  # not finished (train said where it stopped): a job script can requeue it
        sys.exit(EXIT_TIME_LIMIT)


@cli.command()
@click.argument("checkpoints_or_runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.argument("images_dir", type=click.Path())
@options_of(PredictSettings)
def predict(checkpoints_or_runs, images_dir, **opts):
    """Predict the cell line of every sample in IMAGES_DIR with a checkpoint, or a run's best.pt (its best
    validated epoch; a run without one is refused: name its last.pt to use that).

    Several checkpoints or runs (k folds, say) before IMAGES_DIR predict as an ensemble: their probabilities
    are averaged, each model with its own preprocessing; their classes must be the same."""
    from dalipipe.infer.predict import predict as run

    settings = PredictSettings(checkpoints=tuple(checkpoints_or_runs), images_dir=images_dir, **opts)
    out_csv = settings.out_csv
    on_interrupt(f"nothing was written to {out_csv}; run the command again")
    sub = run(settings)
    models = len(checkpoints_or_runs)
    click.echo(f"wrote {len(sub)} predictions to {out_csv}" + (f" (ensemble of {models} models)" if models > 1 else ""))


@cli.command()
@click.argument("images_dir", type=click.Path())
@click.argument("labels_csv", required=False, type=click.Path())
@options_of(CheckSettings)
def check(**opts):
    """Check IMAGES_DIR (and LABELS_CSV) as a run would, without training: the first problem, or what a
    run would use (samples, classes, image sizes, channel statistics)."""
    from dalipipe.data.check import summarize

    settings = CheckSettings(**opts)
    on_interrupt("the decoded store keeps the samples stored so far; run the command again to finish it"
                 if settings.decode_once else "nothing was written; run the command again")
    for line in summarize(settings):
        click.echo(line)


@cli.command()
@click.argument("images_dir", type=click.Path())
@click.argument("labels_csv", type=click.Path())
@options_of(PreviewSettings)
def preview(**opts):
    """Draw what the loaders hand the model for a few samples of IMAGES_DIR, beside their stored channels
    (the data is checked as train checks it first)."""
    from dalipipe.viz.preview import preview as run

    settings = PreviewSettings(**opts)
    on_interrupt(f"nothing was written to {settings.out_png}; run the command again")
    shown = run(settings)
    extra = "" if shown["max_difference"] is None else f"; the loaders differ by at most {shown['max_difference']} gray level(s)"
    click.echo(f"wrote {shown['samples']} samples ({' and '.join(shown['loaders'])}, "
               f"{'augmented' if settings.augment else 'not augmented'}) to {settings.out_png}{extra}")


@cli.command()
@click.argument("submission_csv", type=click.Path())
@click.argument("answers_csv", type=click.Path())
def score(submission_csv, answers_csv):
    """Balanced accuracy of SUBMISSION_CSV against ANSWERS_CSV (file_id,cell_line), and each class's
    precision, recall and F1.

    Every id of ANSWERS_CSV needs a prediction (a missing one is an error naming it); predictions for ids
    that are not in ANSWERS_CSV are ignored with a warning that counts them. Other columns of either file
    (a submission's probabilities) are ignored."""
    from dalipipe.infer.score import scored

    result = scored(submission_csv, answers_csv)
    click.echo(f"balanced accuracy {result.balanced_accuracy:.4f}\n\nper class (recall is each class's accuracy; "
               f"balanced accuracy is their mean):\n{result.report}")


def main() -> None:
    try:
        code = cli.main(prog_name="dalipipe", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # a bare `dalipipe`: its help, as asked
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        code = 0
    except click.UsageError as e:
        # One line, as every other bad input: click's own form puts a usage and a hint line before it.
        where = e.ctx.command_path if e.ctx else "dalipipe"
        click.echo(f"Error: {e.format_message()} (see: {where} --help)", err=True)
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)  # (non-standalone click returns a command's own value)
