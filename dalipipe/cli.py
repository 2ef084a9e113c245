"""The command line: parse, call, report. Bad input ends in a one-line `Error:` and exit status 2."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from dalipipe.config import TrainConfig
from dalipipe.constants import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_TIME_LIMIT, EXIT_USER
from dalipipe.errors import DataError

_DEFAULTS = TrainConfig(images_dir="", labels_csv="", out_dir="")
LOADER_HELP = "dali: NVIDIA DALI (decoding and augmentation on the GPU where there is one); torch: PIL and a DataLoader."
DEVICE_HELP = "auto: the GPU when torch sees one, else the CPU; gpu: fail without one."
CACHE_HELP = ("--cache: trust the checks remembered for unchanged files; --no-cache: check every image again.")


def cache_option(default: bool | None):
    """--cache/--no-cache, the same for every command that checks images. train's default is None (not
    given), so that a resume keeps the run's setting unless the command says otherwise."""
    shown = "" if default is None else f" [default: {'--cache' if default else '--no-cache'}]"
    return click.option("--cache/--no-cache", "check_cache", default=default, help=CACHE_HELP + shown)


# ctx.meta key: a function that says, when Ctrl-C stops the command, what is on disk and what to do next.
ON_INTERRUPT = "dalipipe.on_interrupt"
# Set to 1 by a script that runs dalipipe and says itself what comes after a Ctrl-C (make demo): the
# command then stops with exit 130 and no line of its own, which would point the user elsewhere.
NO_INTERRUPT_HINT = "DALIPIPE_NO_INTERRUPT_HINT"


def on_interrupt(text) -> None:
    """Set what Ctrl-C reports from here on (text: a string, or a function called at that moment)."""
    click.get_current_context().meta[ON_INTERRUPT] = text if callable(text) else (lambda: text)


def _may_change() -> str:
    from dalipipe.run_dir import RESUME_MAY_CHANGE, option

    names = [option(k) for k in RESUME_MAY_CHANGE]
    return ", ".join(names[:-1]) + " and " + names[-1]


class UserError(click.ClickException):
    exit_code = EXIT_USER


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler's notice before a pre-emption): the command stops as
    Ctrl-C stops it (pending writes finished, a line saying what is on disk), with exit status 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DataError as e:
            raise UserError(str(e)) from None
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
@click.option("--n-train", default=9632, show_default=True, help="Training samples.")
@click.option("--n-test", default=6869, show_default=True, help="Test samples.")
@click.option("--classes", "n_classes", default=9, show_default=True, help="Number of cell lines.")
@click.option("--size", "image_size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seeds the images and the labels drawn.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def synth(out_dir, n_train, n_test, n_classes, image_size, seed, force):
    """Write a synthetic dataset in the challenge's layout to OUT_DIR."""
    from dalipipe.synthetic import SynthSpec, generate

    spec = SynthSpec(n_train=n_train, n_test=n_test, n_classes=n_classes, image_size=image_size, seed=seed)
    on_interrupt(f"{out_dir} holds part of the data set; run the command again with --force to replace it")
    path = generate(out_dir, spec, force=force)
    click.echo(f"wrote {n_train} training and {n_test} test samples ({n_classes} classes, {image_size}px) to {path}")


@cli.command()
@click.argument("images_dir", required=False, type=click.Path())
@click.argument("labels_csv", required=False, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run directory for checkpoints, metrics, plots.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this directory with its own settings. "
                   f"{_may_change()} may change; other options may be given only with the run's values; "
                   "IMAGES_DIR and LABELS_CSV may point at moved data.")
@click.option("--epochs", type=int, help=f"Passes over the training split. [default: {_DEFAULTS.epochs}]")
@click.option("--batch-size", type=int, help=f"Per process. [default: {_DEFAULTS.batch_size}]")
@click.option("--lr", type=float, help="[default: 7e-5 with --weights/--pretrained, 1e-3 from scratch]")
@click.option("--weight-decay", type=float, help=f"Adam's L2 penalty. [default: {_DEFAULTS.weight_decay:g}]")
@click.option("--image-size", type=int, help=f"Side of the square model input, in pixels. [default: {_DEFAULTS.augment.image_size}]")
@click.option("--val-fraction", type=float, help=f"Share of the labelled samples held out for validation (stratified). [default: {_DEFAULTS.val_fraction}]")
@click.option("--seed", type=int, help=f"Seeds the split, the shuffling and the augmentation. [default: {_DEFAULTS.seed}]")
@click.option("--loader", type=click.Choice(["dali", "torch"]), help=f"{LOADER_HELP} [default: {_DEFAULTS.loader}]")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), help=f"{DEVICE_HELP} [default: {_DEFAULTS.device}]")
@click.option("--workers", type=int, help="Loader threads (DALI) or processes (torch). [default: cores, at most 8]")
@click.option("--decoder", type=click.Choice(["mixed", "cpu"]),
              help="DALI on a GPU: a mixed decoder per channel, or one CPU pool and one copy per batch. [default: mixed]")
@click.option("--decode-cache/--no-decode-cache", "decode_cache", default=None,
              help="DALI on a GPU (--decoder mixed): keep the decoded images in GPU memory, so that from the second "
                   "epoch on no PNG is decoded (cached as RGB: about 390 MB for the challenge's training set). "
                   "[default: off, until measured]")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
              help="Mixed precision on a GPU: auto = bf16 where the GPU has native bf16, else fp16 with a gradient "
                   "scaler; bf16 and fp16 need a GPU; fp32 turns it off. The CPU runs fp32. [default: auto]")
@cache_option(None)
@click.option("--compile/--no-compile", "compile", default=None,
              help="Run the training steps through torch.compile (compiles first; off until a GPU measurement shows it pays).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Local ImageNet weights for efficientnet-b1.")
@click.option("--pretrained/--no-pretrained", default=None, help="Download ImageNet weights (needs internet). [default: off]")
@click.option("--subset", type=int,
              help="Use this many labelled samples, in the classes' proportions (at least one of each class).")
@click.option("--checkpoint-every", type=int, help="Also save last.pt every N training steps (exact resume mid-epoch).")
@click.option("--checkpoint-minutes", type=float,
              help="Also save last.pt mid-epoch every M minutes: a kill costs at most that. [default: 5]")
@click.option("--time-limit", "time_limit_minutes", type=float,
              help="Minutes; then stop at the next step with a checkpoint there (resume later with --resume).")
@click.option("--tensorboard/--no-tensorboard", default=None,
              help="Also write TensorBoard event files to RUN_DIR/tensorboard (needs: pip install "
                   "'dalipipe[tensorboard]'); view them with: tensorboard --logdir RUN_DIR/tensorboard. [default: off]")
@click.option("--ema", type=float, metavar="DECAY",
              help="Keep an exponential moving average of the weights (e.g. 0.999; its decay warms up over the "
                   "first steps) and validate, save as best.pt and predict with it. Costs one multi-tensor update "
                   "of a model copy per step (about 2 ms on a CPU core) and the copy's memory (26 MB). "
                   "[default: off, as the reference]")
@click.option("--class-weights", type=click.Choice(["none", "balanced"]),
              help="balanced: weight the cross-entropy by the inverse class frequency of the training split, so "
                   "that every class counts equally (the challenge's balanced accuracy does). Free. [default: none, "
                   "as the reference]")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]),
              help="Learning rate per step: constant, or a cosine from --lr down to 0 at the last epoch. Free. "
                   "[default: constant, as the reference]")
@click.option("--warmup-epochs", type=float,
              help="Raise the learning rate linearly from near 0 to --lr over this many epochs first. Free. "
                   "[default: 0, as the reference]")
@click.option("--label-smoothing", type=float, metavar="EPS",
              help="Cross-entropy against targets with EPS spread over all classes. Free. [default: 0, as the "
                   "reference]")
@click.option("--folds", type=int, metavar="K",
              help="Stratified K-fold split (seeded by --seed: the same folds for the same data and scikit-learn "
                   "release) instead of --val-fraction; give --fold too. Costs K runs for an ensemble. "
                   "[default: off, as the reference]")
@click.option("--fold", type=int, metavar="I",
              help="With --folds K: fold I (1 to K) is the validation split, the rest is trained on.")
@click.option("--tta-val/--no-tta-val", "tta_val", default=None,
              help="Validate with the probabilities averaged over the four flips, as predict --tta (about 4x "
                   "validation's compute). [default: off, as the reference]")
def train(images_dir, labels_csv, out_dir, resume_dir, **opts):
    """Train on IMAGES_DIR with LABELS_CSV (file_id,cell_line) into --out RUN_DIR."""
    from dalipipe import run_dir
    from dalipipe.train import train as run

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
        click.echo(f"best validation balanced accuracy {result.best_val_balanced_accuracy:.4f}; run in {cfg.out_dir}")
    if result.stopped_early:  # not finished (train said where it stopped): a job script can requeue it
        sys.exit(EXIT_TIME_LIMIT)


@cli.command()
@click.argument("checkpoints_or_runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.argument("images_dir", type=click.Path())
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False), help="Submission CSV to write.")
@click.option("--ids", "ids_csv", type=click.Path(), help="CSV whose file_id column restricts and orders the output.")
@click.option("--probs/--no-probs", default=False, help="Add one probability column per class. [default: off]")
@click.option("--loader", type=click.Choice(["dali", "torch"]), default="dali", show_default=True,
              help=f"{LOADER_HELP} Both give the same predictions.")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Samples per inference batch (memory and speed).")
@click.option("--workers", type=int, help="Loader threads (DALI) or processes (torch). [default: cores, at most 8]")
@click.option("--tta/--no-tta", default=False,
              help="Average each image's probabilities over it and its horizontal, vertical and double flips "
                   "(4x the compute of a plain prediction). [default: off, as the reference]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@cache_option(True)
def predict(checkpoints_or_runs, images_dir, out_csv, ids_csv, probs, loader, device, batch_size, workers, tta, force,
            check_cache):
    """Predict the cell line of every sample in IMAGES_DIR with a checkpoint (or a run's best).

    Several checkpoints or runs (k folds, say) before IMAGES_DIR predict as an ensemble: their probabilities
    are averaged, each model with its own preprocessing; their classes must be the same."""
    from dalipipe.predict import predict as run

    on_interrupt(f"nothing was written to {out_csv}; run the command again")
    sub = run(list(checkpoints_or_runs), images_dir, out_csv, ids_csv, probs, loader, device, batch_size, workers,
              force, cache=check_cache, tta=tta)
    models = len(checkpoints_or_runs)
    click.echo(f"wrote {len(sub)} predictions to {out_csv}" + (f" (ensemble of {models} models)" if models > 1 else ""))


@cli.command()
@click.argument("images_dir", type=click.Path())
@click.argument("labels_csv", required=False, type=click.Path())
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True,
              help="As for train: the share held out for validation, for the split shown.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="As for train: the seed of the split shown.")
@cache_option(True)
def check(images_dir, labels_csv, val_fraction, seed, check_cache):
    """Check IMAGES_DIR (and LABELS_CSV) as a run would, without training: the first problem, or what a
    run would use (samples, classes, image sizes, channel statistics)."""
    from dalipipe.check import summarize

    cfg = TrainConfig(images_dir=images_dir, labels_csv=labels_csv or "", out_dir="", val_fraction=val_fraction,
                      seed=seed, check_cache=check_cache)
    for line in summarize(images_dir, labels_csv, cfg):
        click.echo(line)


@cli.command()
@click.argument("images_dir", type=click.Path())
@click.argument("labels_csv", type=click.Path())
@click.option("--out", "out_png", default="preview.png", show_default=True, type=click.Path(dir_okay=False),
              help="The picture to write.")
@click.option("--loader", type=click.Choice(["dali", "torch", "both"]), default="both", show_default=True,
              help="Whose output to show; both: side by side.")
@click.option("--n", "n", type=int, default=16, show_default=True,
              help="Samples (rows), drawn in the classes' proportions.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="The training augmentation (random crop, rotation, flips), or the evaluation resize only "
                   "(the two loaders then agree: the title says by how much).")
@click.option("--image-size", type=int, default=_DEFAULTS.augment.image_size, show_default=True,
              help="Side of the model input, in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the samples drawn and the augmentation.")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--workers", type=int, help="Loader threads (DALI) or processes (torch). [default: cores, at most 8]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@cache_option(True)
def preview(images_dir, labels_csv, out_png, loader, n, augment, image_size, seed, device, workers, force, check_cache):
    """Draw what the loaders hand the model for a few samples of IMAGES_DIR, beside their stored channels
    (the data is checked as train checks it first)."""
    from dalipipe.preview import preview as run

    on_interrupt(f"nothing was written to {out_png}; run the command again")
    shown = run(images_dir, labels_csv, out_png, loader, n, augment, seed, device, image_size, workers, force,
                cache=check_cache)
    extra = "" if shown["max_difference"] is None else f"; the loaders differ by at most {shown['max_difference']} gray level(s)"
    click.echo(f"wrote {shown['samples']} samples ({' and '.join(shown['loaders'])}, "
               f"{'augmented' if augment else 'not augmented'}) to {out_png}{extra}")


@cli.command()
@click.argument("submission_csv", type=click.Path())
@click.argument("answers_csv", type=click.Path())
def score(submission_csv, answers_csv):
    """Balanced accuracy of SUBMISSION_CSV against ANSWERS_CSV (file_id,cell_line).

    Every id of ANSWERS_CSV needs a prediction (a missing one is an error naming it); predictions for ids
    that are not in ANSWERS_CSV are ignored with a warning that counts them. Other columns of either file
    (a submission's probabilities) are ignored."""
    from dalipipe.predict import score as run

    click.echo(f"balanced accuracy {run(submission_csv, answers_csv):.4f}")


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
