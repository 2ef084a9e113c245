"""Break each rule dalipipe states about what it guarantees, one at a time, and see whether a test notices.

Each breakage below is one small change to the code (a line replaced) that violates one rule the README
or a code comment states, and names the tests that guard that rule. For each, in a scratch copy of the
checkout: apply the change, run those tests, restore. A breakage whose tests still pass "survives": the
rule it breaks is promised but not tested. Run it after changing a rule or its tests; it is not part of
`make test` (it runs tests once per breakage: about an hour for all of them on two cores).

    python scripts/break_rules.py              # every breakage; exit 1 if one survives
    python scripts/break_rules.py -k fsync     # those whose name or file contains 'fsync'
    python scripts/break_rules.py --list       # what would be broken, and the tests that guard each
    python scripts/break_rules.py --stale      # the entries whose text or tests moved (runs no test: seconds)

A new rule gets a breakage here with its test; a breakage whose `old` text no longer occurs exactly once in
its file is reported as stale (the code moved: update the entry).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import processes  # noqa: E402  (the tests' own process-tree kill; needs the test extra)
# Longer than the slowest guarding tests take on a busy 2-core machine; a breakage that makes a test hang
# is caught all the same (reported as such).
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Breakage:
    name: str  # the rule, as a short sentence of what is now broken
    file: str  # relative to the checkout
    old: str  # occurs exactly once in file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must notice


T_DATA = "tests/test_data.py"
T_PNG = "tests/test_pngio.py"
T_ROBUST = "tests/test_robustness.py"
T_LOADERS = "tests/test_loaders.py"
T_LARGE = "tests/test_large_images.py"
T_RECORDER = "tests/test_run_recorder.py"
T_OPTS = "tests/test_options_table.py"
T_MSG = "tests/test_options_and_messages.py"
T_TTA = "tests/test_tta_and_ensembles.py"
T_RESUME = "tests/test_exact_resume.py"
T_DDP = "tests/test_distributed.py"
T_WAIT = "tests/test_data_wait.py"
T_RECIPE = "tests/test_recipe.py"
T_TRAIN = "tests/test_train.py"
T_STORE = "tests/test_decoded_store.py"

BREAKAGES = [
    # --- CSV rules (dalipipe/data/csv_files.py) -------------------------------------------------------
    Breakage("ids may be spelled '+1' (digits only)", "dalipipe/data/csv_files.py",
             'if not re.fullmatch(r"[0-9]+", fid):', 'if not re.fullmatch(r"[+0-9]+", fid):', (T_DATA,)),
    Breakage("a duplicate file_id is accepted", "dalipipe/data/csv_files.py",
             "        if n in first_line:\n", "        if False:\n", (T_DATA,)),
    Breakage("a byte-order mark is read as part of the header", "dalipipe/data/csv_files.py",
             'bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""', 'bom = b""', (T_DATA, T_ROBUST)),
    Breakage("CSV errors count rows instead of the lines an editor shows", "dalipipe/data/csv_files.py",
             "start = reader.line_num + 1", "start += 1", (T_DATA,)),
    Breakage("rows of empty fields are not skipped", "dalipipe/data/csv_files.py",
             "if any(f.strip() for f in fields):", "if fields:", (T_DATA, T_MSG)),
    Breakage("a CSV that is not UTF-8 is read with replacement characters", "dalipipe/data/csv_files.py",
             'text = data[len(bom):].decode("utf-8")', 'text = data[len(bom):].decode("utf-8", errors="replace")',
             (T_DATA, T_ROBUST)),
    Breakage("columns are taken by position, not by name", "dalipipe/data/csv_files.py",
             "fields[header.index(c)].strip()", "fields[columns.index(c)].strip()", (T_DATA, T_MSG)),
    Breakage("an empty cell_line is accepted", "dalipipe/data/csv_files.py",
             "    if len(empty):\n", "    if False:\n", (T_DATA,)),
    # --- the image check and the gray rule ------------------------------------------------------------
    Breakage("a PNG chunk with a bad CRC passes the check", "dalipipe/data/pngio.py",
             "if zlib.crc32(data[pos + 4 : end]) != crc:", "if False:", (T_PNG, T_DATA)),
    Breakage("16-bit gray is value >> 8, not round(value / 257)", "dalipipe/data/pngio.py",
             "np.floor(a / 257.0 + 0.5)", "np.floor(a / 256.0)", (T_PNG,)),
    Breakage("a colour PNG with a gamma chunk is accepted", "dalipipe/data/pngio.py",
             "abs(float(gamma) - 1.0) > 1e-3", "abs(float(gamma) - 1.0) > 10", (T_PNG,)),
    Breakage("channels of one sample may differ in size", "dalipipe/data/pngio.py",
             "if len(set(shapes)) != 1:", "if False:", (T_DATA,)),
    Breakage("the check cache trusts a file whose contents changed but whose size did not",
             "dalipipe/data/check_cache.py", "for v in (st.st_size, st.st_mtime_ns)]", "for v in (st.st_size,)]",
             (T_DATA,)),
    Breakage("the check cache trusts memories of another check version", "dalipipe/data/check_cache.py",
             '(data.get("version") == CHECK_VERSION and data.get("gray_rule", 1)', '(True and data.get("gray_rule", 1)',
             (T_DATA,)),
    Breakage("a sample that failed the check is remembered as checked", "dalipipe/data/index.py",
             "                if results[i] is not None:\n", "                if True:\n", (T_DATA,)),
    Breakage("a label without images is not an error", "dalipipe/data/index.py",
             "    if missing:\n", "    if False:\n", (T_DATA,)),
    Breakage("images far larger than the rest pass unnamed", "dalipipe/data/index.py",
             "large = index[pixels > LARGE_IMAGE_FACTOR * pixels.median()]",
             "large = index[pixels > 1e12 * pixels.median()]", (T_ROBUST,)),
    Breakage("the statistics weight every pixel, so one large image dominates", "dalipipe/data/stats.py",
             'mean = [float(index[c].mean()) for c in MEAN_COLUMNS]',
             'mean = [float((index[c] * index["height"] * index["width"]).sum() / (index["height"] * index["width"]).sum()) for c in MEAN_COLUMNS]',
             (T_ROBUST, T_DATA)),
    # --- options -------------------------------------------------------------------------------------
    # Each settings' own table check, one at a time: no other code repeats a bound or a choice, so each is
    # noticed by its own tests (a value refused on the command's line and on its settings made directly).
    Breakage("train's settings skip the table's check", "dalipipe/config.py",
             "        options.check(self)  # each option's own bounds and choices, from the table\n", "", (T_OPTS, T_MSG)),
    Breakage("predict's settings skip the table's check", "dalipipe/settings.py",
             "class PredictSettings(_Checked):", "class PredictSettings:", (T_OPTS, T_MSG)),
    Breakage("preview's settings skip the table's check", "dalipipe/settings.py",
             "        super().__post_init__()\n        if Path(self.out_png)", "        if Path(self.out_png)",
             (T_OPTS, T_MSG)),
    Breakage("check's settings skip the table's check", "dalipipe/settings.py",
             "class CheckSettings(_Checked):", "class CheckSettings:", (T_OPTS, T_MSG)),
    Breakage("synth's settings skip the table's check", "dalipipe/settings.py",
             "        options.check(self)\n        if self.n_train < 2 * self.n_classes:",
             "        if self.n_train < 2 * self.n_classes:", (T_OPTS, T_MSG)),
    Breakage("the loader benchmark's settings skip the table's check", "dalipipe/settings.py",
             "class LoaderSpeedSettings(_Checked):", "class LoaderSpeedSettings:", (T_OPTS,)),
    Breakage("an option's help text changes and the docs' option lists keep the old one", "dalipipe/config.py",
             '"Passes over the training split."', '"Passes over the whole training split."', ("tests/test_docs.py",)),
    Breakage("the docs' option check finds no stale list", "scripts/option_docs.py",
             'found.append(f"{page.relative_to(ROOT)}: {\', \'.join(names)}")', "pass", ("tests/test_docs.py",)),
    Breakage("an inclusive lower bound excludes its own value", "dalipipe/options.py",
             "(value > s.low if s.low_open else value >= s.low)", "(value > s.low)", (T_OPTS,)),
    Breakage("a resume accepts a new value of a fixed setting", "dalipipe/run/run_dir.py",
             "fixed = {k: v for k, v in given.items() if k not in RESUME_MAY_CHANGE}", "fixed = {}",
             (T_OPTS, T_ROBUST)),
    Breakage("a resume may ask for fewer epochs than were trained", "dalipipe/run/run_dir.py",
             'if given.get("epochs", cfg.epochs) < card.epoch:', "if False:", ("tests/test_resume_options.py",)),
    Breakage("--time-limit carries over to the resumed command", "dalipipe/run/run_dir.py",
             "cfg = dataclasses.replace(TrainConfig.from_dict(card.config), time_limit_minutes=None)",
             "cfg = TrainConfig.from_dict(card.config)",
             (f"{T_MSG}::test_time_limit_applies_to_its_command_only_and_exits_with_its_own_status",)),
    Breakage("--folds and --val-fraction are both accepted", "dalipipe/run/run_dir.py",
             'if "folds" in given and "val_fraction" in given:', "if False:", (T_TTA,)),
    # --- atomic and durable writes -------------------------------------------------------------------
    Breakage("an atomic write is not fsynced before the rename", "dalipipe/atomic.py",
             "            os.fsync(f.fileno())\n", "            pass\n", (T_ROBUST,)),
    Breakage("the folder is not fsynced after the rename", "dalipipe/atomic.py",
             "        fsync_folder(path.parent)\n", "", (T_ROBUST,)),
    Breakage("written files ignore the umask", "dalipipe/atomic.py",
             "os.chmod(tmp, 0o666 & ~current_umask())", "pass", (T_ROBUST,)),
    Breakage("a write that must not replace replaces a file made meanwhile", "dalipipe/atomic.py",
             "            _move_new(tmp, path)\n", "            os.replace(tmp, path)\n", (T_ROBUST,)),
    Breakage("a failed atomic write leaves its temporary file", "dalipipe/atomic.py",
             "        if os.path.exists(tmp):\n            os.unlink(tmp)\n", "        pass\n", (T_ROBUST,)),
    Breakage("a command's --out is replaced without --force", "dalipipe/atomic.py",
             "    if not force and Path(path).exists():\n", "    if False:\n", (T_ROBUST, "tests/test_cli.py")),
    # --- checkpoints: best and last, the run folder ----------------------------------------------------
    Breakage("best.pt is a second copy of last.pt, not the same file", "dalipipe/checkpoint.py",
             "                    link_or_copy(self.out / CKPT_LAST, self.out / CKPT_BEST)",
             "                    copy(self.out / CKPT_LAST, self.out / CKPT_BEST)", (T_RECORDER,)),
    Breakage("a checkpoint of an earlier release, without the best epoch's confusion matrix, is refused",
             "dalipipe/checkpoint.py", 'ck.get("best_confusion")),', 'ck["best_confusion"]),',
             ("tests/test_earlier_release_runs.py",)),
    Breakage("each save reads the run's settings and versions again (two more modules in one epoch's loop)",
             "dalipipe/checkpoint.py", "self.state.to_checkpoint(ranks, partial_steps, self.config, self.made_by)",
             "self.state.to_checkpoint(ranks, partial_steps, self.state.config.to_dict(), versions())",
             ("tests/test_loop_modules.py",)),
    Breakage("a checkpoint skipped after a failed write leaves the next save waiting forever",
             "dalipipe/run/run_recorder.py",
             "                if then is not None:  # (whoever waits for this job is not left waiting)",
             "                if False:  # (whoever waits for this job is not left waiting)", (T_RECORDER,)),
    Breakage("the recorder's forked worker undoes the normalization with torch (it can hang after torch's threads)",
             "dalipipe/run/run_recorder.py",
             "        return display_images(self.images, self.norm)",
             "        import torch\n        return display_images(torch.from_numpy(self.images), self.norm)",
             (f"{T_RECORDER}::test_a_second_run_in_one_process_after_torch_ran_on_several_threads_ends",)),
    Breakage("a tie with the best score is a new best", "dalipipe/checkpoint.py",
             "improved = score > self.best + 1e-9", "improved = score >= self.best", (T_TRAIN,)),
    Breakage("a score better by float noise only is a new best", "dalipipe/checkpoint.py",
             "improved = score > self.best + 1e-9", "improved = score > self.best", (T_TRAIN,)),
    Breakage("the repair after a kill never links best.pt", "dalipipe/checkpoint.py",
             "if saved.partial_steps is None and saved.progress.last_epoch_was_best() and (",
             "if False and (", ("tests/test_resume_options.py", T_ROBUST)),
    Breakage("the last epoch counts as the best whatever its score", "dalipipe/checkpoint.py",
             'return self.best_confusion["epoch"] == self.epochs_done', "return True",
             ("tests/test_resume_options.py",)),
    Breakage("a checkpoint may hold code that runs on load", "dalipipe/checkpoint.py",
             "weights_only=True", "weights_only=False", (T_ROBUST,)),
    Breakage("a run folder does not stand for its best.pt", "dalipipe/checkpoint.py",
             "        if (p / CKPT_BEST).is_file():\n            return p / CKPT_BEST\n", "", (T_ROBUST,)),
    Breakage("a run folder without best.pt predicts with its unvalidated last.pt", "dalipipe/checkpoint.py",
             '            raise DataError(f"{p}: no {CKPT_BEST} (no', '            return p / CKPT_LAST\n            raise DataError(f"{p}: no {CKPT_BEST} (no',
             (T_ROBUST,)),
    Breakage("predict says nothing of a checkpoint from the middle of an epoch", "dalipipe/infer/predict.py",
             "        if card.partial_steps is not None:\n", "        if False:\n", (T_ROBUST,)),
    Breakage("a second checkpoint is staged while the first is written", "dalipipe/checkpoint.py",
             "        self.written.wait()  # the previous copy's buffers are about to be reused\n",
             "", (T_RECORDER,)),
    Breakage("the snapshot keeps the live tensors instead of copies", "dalipipe/checkpoint.py",
             "            buf = self._buffer(path, x)\n            buf.copy_(x.detach(), non_blocking=x.is_cuda)\n",
             "            buf = x\n", (T_RECORDER,)),
    Breakage("a second train into a busy folder is not refused", "dalipipe/run/run_dir.py",
             "        if not _try_lock(f):\n            raise", "        if False:\n            raise", (T_ROBUST,)),
    # --- loaders: equivalence, epochs, augmentation ---------------------------------------------------
    Breakage("DALI decides both flips with one coin", "dalipipe/loading/dali_loader.py",
             "scale=fn.stack(sign(spec.hflip_p), sign(spec.vflip_p))", "scale=fn.stack(*[sign(spec.hflip_p)] * 2)",
             (T_LOADERS,)),
    Breakage("the torch loader decides both flips with one coin", "dalipipe/loading/augment.py",
             "fy = -1.0 if rng.random() < spec.vflip_p else 1.0", "fy = fx", (T_LOADERS, "tests/test_augment.py")),
    Breakage("the torch loader shrinks large images without antialiasing", "dalipipe/loading/augment.py",
             'mode="bilinear", align_corners=False, antialias=True)',
             'mode="bilinear", align_corners=False, antialias=False)', (T_LARGE,)),
    Breakage("DALI's evaluation shrinks large images without antialiasing", "dalipipe/loading/dali_loader.py",
             "images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True",
             "images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=False", (T_LARGE,)),
    Breakage("DALI's training shrinks large images without antialiasing", "dalipipe/loading/dali_loader.py",
             "images = fn.resize(images, size=working, interp_type=types.INTERP_LINEAR, antialias=True",
             "images = fn.resize(images, size=working, interp_type=types.INTERP_LINEAR, antialias=False", (T_LARGE,)),
    Breakage("the torch shrink renormalizes at the edges (torch's rule, not DALI's)", "dalipipe/loading/augment.py",
             "    out = F.interpolate(images, size=(out_h, out_w),", "    return F.interpolate(images, size=(out_h, out_w),",
             (T_LARGE,)),
    Breakage("DALI's training crop is not scaled to the shrunk image", "dalipipe/loading/dali_loader.py",
             'matrix = fn.transforms.combine(to_source, _train_matrix(shape, spec), name="working_to_output")',
             "matrix = _train_matrix(shape, spec)", (T_LARGE,)),
    Breakage("DALI keeps the shrink step where no image needs it (64 px loading 18% slower)",
             "dalipipe/loading/dali_loader.py", "    shrink = largest_side is None or", "    shrink = True or", (T_LARGE,)),
    Breakage("a DALI state saved before the graph gained the shrink is refused", "dalipipe/loading/dali_loader.py",
             "        checkpoint = dali_state.fit(checkpoint, fresh.checkpoint())", "        pass",
             ("tests/test_dali_state.py", "tests/test_earlier_release_runs.py")),
    Breakage("an operator of the shrink step takes an automatic name, renaming the random operators after it",
             "dalipipe/loading/dali_loader.py", 'axes=[0], name="source_hw")', "axes=[0])",
             ("tests/test_earlier_release_runs.py",)),
    Breakage("the torch evaluation resize of small images changes (bicubic)", "dalipipe/loading/augment.py",
             'size=(size, size), mode="bilinear"', 'size=(size, size), mode="bicubic"',
             ("tests/test_earlier_release_runs.py", T_LARGE)),
    Breakage("the torch loader's augmentation is the same in every epoch", "dalipipe/loading/torch_loader.py",
             "rng = np.random.default_rng([self.seed, epoch, i])", "rng = np.random.default_rng([self.seed, i])",
             (T_LOADERS,)),
    Breakage("the DALI training order is the same in every epoch", "dalipipe/loading/dali_loader.py",
             "shuffle_after_epoch=train,", "shuffle_after_epoch=False,", (T_LOADERS,)),
    Breakage("DALI's last partial batch spills into the next epoch", "dalipipe/loading/dali_loader.py",
             "pad_last_batch=True)", "pad_last_batch=False)", (T_LOADERS,)),
    Breakage("a last training batch of one sample is kept", "dalipipe/loading/loader_rules.py",
             "steps = full + (1 if rest >= MIN_TRAIN_BATCH else 0)", "steps = full + (1 if rest else 0)",
             (T_LOADERS, "tests/test_cli.py::test_training_split_one_more_than_a_multiple_of_the_batch")),
    Breakage("ranks train on shards of different sizes", "dalipipe/loading/loader_rules.py",
             "per_rank = n // num_shards", "per_rank = -(-n // num_shards)", (T_LOADERS,)),
    Breakage("DALI channel readers out of step pass unnoticed", "dalipipe/loading/dali_loader.py",
             "if not (torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])):", "if False:",
             (T_LOADERS,)),
    Breakage("the torch loader does not normalize by the mean", "dalipipe/loading/torch_loader.py",
             "return (out[0] - self.mean) * self.inv_std", "return out[0] * self.inv_std", (T_LOADERS,)),
    Breakage("the channels are stacked red, yellow, blue", "dalipipe/constants.py",
             'CHANNELS: tuple[str, ...] = ("yellow", "red", "blue")',
             'CHANNELS: tuple[str, ...] = ("red", "yellow", "blue")', (T_LOADERS, T_DATA)),
    # --- exact resume and reseeding -------------------------------------------------------------------
    Breakage("a resumed torch epoch starts again from its first batch", "dalipipe/loading/torch_loader.py",
             "self.sampler.start = self.done * self.loader.batch_size", "self.sampler.start = 0",
             (f"{T_RESUME}::test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run",)),
    Breakage("the torch loader's workers draw their seed from torch's global generator",
             "dalipipe/loading/torch_loader.py", "generator=torch.Generator().manual_seed(seed))", ")",
             (f"{T_RESUME}::test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run",)),
    Breakage("a mid-epoch checkpoint resumes with another number of processes", "dalipipe/checkpoint.py",
             "    if len(ranks) != world.size:\n        if partial_steps:", "    if len(ranks) != world.size:\n        if False:",
             (T_TRAIN, T_RESUME)),
    Breakage("a resume reseeds torch's generator instead of restoring it", "dalipipe/checkpoint.py",
             "    torch.set_rng_state(mine.rng_cpu)\n", "",
             (f"{T_RESUME}::test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run",)),
    Breakage("a run stores its data paths as given, not resolved", "dalipipe/run/run_dir.py",
             "TrainConfig(images_dir=str(Path(images_dir).resolve()),", "TrainConfig(images_dir=images_dir,",
             (T_ROBUST, "tests/test_cli.py")),
    Breakage("a mid-epoch checkpoint of another loader resumes anyway", "dalipipe/checkpoint.py",
             "    if mine.loader_key != key:\n        if partial_steps:", "    if mine.loader_key != key:\n        if False:",
             (T_TRAIN,)),
    Breakage("a resumed run takes its first batch as a new run's: recalibrates BatchNorm, draws train_batch.png",
             "dalipipe/run/train.py", "                               if new_run and epoch == 0 else None,",
             "                               if epoch == progress.epochs_done else None,",
             (f"{T_RESUME}::test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run",
              "tests/test_preview_and_tensorboard.py::test_train_batch_and_tensorboard_after_a_kill_and_resume")),
    Breakage("a run from scratch keeps BatchNorm's initial statistics", "dalipipe/run/recipe.py",
             "        if self.from_scratch:\n            calibrate_batchnorm(", "        if False:\n            calibrate_batchnorm(",
             ("tests/test_recipe.py",)),
    # --- distributed figures --------------------------------------------------------------------------
    Breakage("validation counts the padded repeats of the shards", "dalipipe/infer/inference.py",
             "pos, first = np.unique(pos, return_index=True)", "first = np.argsort(pos, kind='stable'); pos = pos[first]",
             ("tests/test_inference.py", T_DDP)),
    Breakage("each rank validates its own BatchNorm statistics", "dalipipe/distributed.py",
             "    if world.size > 1:\n        for buf in module.buffers():", "    if False:\n        for buf in module.buffers():",
             (T_DDP,)),
    Breakage("the data wait is rank 0's, not the most starved process's", "dalipipe/run/train.py",
             "starved = max(ranks, key=lambda r: r.data_wait_s / max(r.train_s, 1e-9))", "starved = ranks[0]",
             (T_TRAIN,)),
    Breakage("the most starved process is the one that waited longest, not the largest share",
             "dalipipe/run/train.py", "starved = max(ranks, key=lambda r: r.data_wait_s / max(r.train_s, 1e-9))",
             "starved = max(ranks, key=lambda r: r.data_wait_s)", (T_TRAIN,)),
    Breakage("the training loss is rank 0's alone", "dalipipe/run/train.py",
             "round(sum(r.loss_sum for r in ranks) / max(seen, 1), 5)",
             "round(ranks[0].loss_sum / max(ranks[0].seen, 1), 5)", (T_TRAIN,)),
    Breakage("images/s is rank 0's time, not the slowest process's", "dalipipe/run/train.py",
             "round(seen / max(max(r.train_s for r in ranks), 1e-9), 1)", "round(seen / max(ranks[0].train_s, 1e-9), 1)",
             (T_TRAIN,)),
    # --- TTA and ensembles ----------------------------------------------------------------------------
    Breakage("TTA averages logits instead of probabilities", "dalipipe/infer/inference.py",
             "return torch.logsumexp(log_p, 0) - math.log(TTA_VIEWS)", "return logits.float().view(TTA_VIEWS, n, -1).mean(0)",
             (T_TTA,)),
    Breakage("TTA's fourth view repeats the horizontal flip", "dalipipe/infer/inference.py",
             "images.flip((-2, -1))])", "images.flip(-1)])", (T_TTA,)),
    Breakage("an ensemble sums instead of averaging its members", "dalipipe/infer/predict.py",
             "total / len(cks), names, s.probs)", "total, names, s.probs)", (T_TTA,)),
    # --- splits, subsets and folds ----------------------------------------------------------------------
    Breakage("subset ties of equal remainders go by name alone", "dalipipe/data/split.py",
             "key=lambda name: (-(left[name] * m % total), -left[name], str(name))",
             "key=lambda name: (-(left[name] * m % total), str(name))", (T_DATA,)),
    Breakage("a class smaller than the folds is accepted", "dalipipe/data/split.py",
             "    small = counts[counts < folds]\n    if len(small):\n", "    small = counts[counts < folds]\n    if False:\n",
             (T_RECIPE,)),
    Breakage("the folds depend on the labels file's row order", "dalipipe/data/split.py",
             'index = index.sort_values("file_id").reset_index(drop=True)  # the folds depend on row order',
             "index = index.reset_index(drop=True)", (T_RECIPE,)),
    # --- the data wait --------------------------------------------------------------------------------
    Breakage("the data wait also counts the steps", "dalipipe/run/data_wait.py",
             "            t = self.clock()  # the step (and a checkpoint) ran in between: not waiting for data\n",
             "", (T_WAIT,)),
    Breakage("the data-wait advice speaks at the command's first epoch", "dalipipe/run/data_wait.py",
             "if self.said or self.epochs_seen == 1 or share <= DATA_WAIT_ADVICE_SHARE:",
             "if self.said or share <= DATA_WAIT_ADVICE_SHARE:", (T_WAIT,)),
    # --- predict and score ------------------------------------------------------------------------------
    Breakage("predict says nothing of samples from the model's own split", "dalipipe/infer/predict.py",
             "    if trained or validated:\n", "    if False:\n", (T_ROBUST,)),
    Breakage("score accepts a predicted class that the answers lack", "dalipipe/infer/score.py",
             "    if unknown.any():\n", "    if False:\n", (T_ROBUST,)),
    Breakage("score passes over answers without a prediction", "dalipipe/infer/score.py",
             "    if missing.any():\n", "    if False:\n", (T_ROBUST,)),
    Breakage("--time-limit exits 1 instead of EX_TEMPFAIL (75)", "dalipipe/constants.py",
             "EXIT_TIME_LIMIT = 75", "EXIT_TIME_LIMIT = 1", (T_MSG, "tests/test_cli.py")),
    Breakage("Ctrl-C exits 1 instead of 130", "dalipipe/constants.py",
             "EXIT_INTERRUPTED = 130", "EXIT_INTERRUPTED = 1", (T_MSG, "tests/test_cli.py")),
    # --- what a new user met: threads, signals, messages, files ------------------------------------------
    Breakage("the thread setting never reaches torch", "dalipipe/device.py",
             "    torch.set_num_threads(threads)\n", "", (T_TRAIN,)),
    Breakage("torch takes every core by default, beside the loader's workers", "dalipipe/loading/loader_rules.py",
             "return max(1, available_cores() // local_processes() - workers)", "return available_cores()", (T_TRAIN,)),
    Breakage("a seed out of range reaches NumPy", "dalipipe/config.py",
             "low=0, high=SEED_MAX)", ")", (T_MSG, T_OPTS)),
    Breakage("synth draws any size asked for", "dalipipe/settings.py",
             "flag=\"size\", low=MIN_IMAGE_SIZE,\n                          high=SYNTH_MAX_SIZE)",
             "flag=\"size\", low=MIN_IMAGE_SIZE)", (T_MSG,)),
    Breakage("synth's folder ignores the umask", "dalipipe/data/synthetic.py",
             "    os.chmod(tmp, 0o777 & ~current_umask())\n", "", ("tests/test_synthetic.py",)),
    Breakage("synth --force removes the old set before the new one is complete", "dalipipe/data/synthetic.py",
             "        _replace_folder(tmp, out)\n",
             "        shutil.rmtree(out, ignore_errors=True)\n        os.replace(tmp, out)\n", ("tests/test_synthetic.py",)),
    Breakage("a second SIGTERM breaks into the stopping", "dalipipe/cli.py",
             "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    raise Terminated()", "    raise Terminated()",
             ("tests/test_cli.py",)),
    Breakage("the demo goes on alone when make is killed", "scripts/demo.py",
             "    die_with_parent(signal.SIGTERM)\n", "", ("tests/test_demo.py",)),
    Breakage("an error quoting a line break takes two lines", "dalipipe/cli.py",
             '.replace("\\n", "\\\\n")', "", (T_ROBUST,)),
    Breakage("a worker's DataError reaches the user as DataLoader's traceback report", "dalipipe/loading/torch_loader.py",
             "                raise DataError(_worker_message(e)) from None\n", "                raise\n",
             ("tests/test_torch_loader_workers.py",)),
    Breakage("the progress bar's last data wait is not the epoch line's", "dalipipe/run/train.py",
             '        bar.set_postfix_str(f"data wait {shown(share_of(wait.seconds, train_s))}")\n', "", (T_TRAIN,)),
    Breakage("a run's best epoch writes no per-class figures", "dalipipe/run/run_recorder.py",
             "    RunFile(VAL_PER_CLASS, NEW_BEST, IN_WORKER, _to_csv, lambda e: (e.best.per_class,)),\n", "",
             ("tests/test_cli.py::test_train_resume_predict_end_to_end",)),
    Breakage("preview writes PNG bytes whatever the name says", "dalipipe/viz/plots.py",
             "        fig.savefig(path, format=fmt, dpi=GRID_DPI)", '        fig.savefig(path, format="png", dpi=GRID_DPI)',
             ("tests/test_preview_and_tensorboard.py",)),
    Breakage("the font notice leaves out names whose characters were named before", "dalipipe/viz/plots.py",
             "if set(t) & missing and t not in _told]", "if set(t) & (missing - _told)]", (T_MSG,)),
    Breakage("the seen-samples warning does not name its model", "dalipipe/infer/predict.py",
             "split of {model} and", "split of this model and", (T_ROBUST,)),
    Breakage("resume refusals say Python's None, False and 0.0", "dalipipe/run/run_dir.py",
             "is {spoken(current[name])} in the run, got {spoken(value)};", "is {current[name]} in the run, got {value};",
             (T_OPTS,)),
    # --- the weight average ---------------------------------------------------------------------------
    Breakage("the weight average skips BatchNorm's running statistics", "dalipipe/ema.py",
             "floats = {k for k, v in mine.items() if v.is_floating_point()}",
             "floats = {k for k, v in mine.items() if v.is_floating_point() and 'running' not in k}", (T_RECIPE,)),
    Breakage("the weight average leaves its integer entries behind", "dalipipe/ema.py",
             "            mine.copy_(theirs)\n", "            pass\n", (T_RECIPE,)),
    # --- the decoded store ------------------------------------------------------------------------------
    Breakage("a store file of another gray rule is read as this rule's", "dalipipe/data/decoded_store.py",
             "json.dumps([STORE_FORMAT, GRAY_RULE, self.images_folder, names, signature])",
             "json.dumps([STORE_FORMAT, self.images_folder, names, signature])",
             (f"{T_STORE}::test_another_gray_rule_or_folder_is_another_file",)),
    Breakage("the store knows an images folder by its name alone, not where it is", "dalipipe/data/decoded_store.py",
             "self.images_folder = str(Path(images_folder).resolve())", "self.images_folder = Path(images_folder).name",
             (f"{T_STORE}::test_a_folder_of_the_same_name_elsewhere_is_another_store",)),
    Breakage("the store writes a sample straight under its name (a cut-short write leaves a partial file there)",
             "dalipipe/data/decoded_store.py",
             '        with open(tmp, "wb") as f:\n            np.save(f, np.stack(arrays, axis=2))\n        os.replace(tmp, file)\n',
             '        with open(file, "wb") as f:\n            np.save(f, np.stack(arrays, axis=2))\n',
             (f"{T_STORE}::test_a_write_cut_short_leaves_no_file_under_the_name",
              f"{T_STORE}::test_a_killed_store_build_leaves_only_complete_files_and_the_next_run_finishes_it")),
    Breakage("the store trusts a file of the wrong size", "dalipipe/data/decoded_store.py",
             "return os.stat(file).st_size == file_bytes(height, width)", "return os.path.isfile(file)",
             (f"{T_STORE}::test_a_write_cut_short_leaves_no_file_under_the_name",)),
    Breakage("the store keeps the stale versions of a changed sample", "dalipipe/data/decoded_store.py",
             "stale = path not in current and _file_stem(path) in stems",
             "stale = path not in current and _file_stem(path) in current",
             (f"{T_STORE}::test_a_changed_png_is_decoded_again",)),
    Breakage("a store that leaves less than the reserve free on its disk is accepted", "dalipipe/data/decoded_store.py",
             "if needed + STORE_RESERVE_BYTES > free:", "if needed > free:",
             (f"{T_STORE}::test_a_store_the_disk_cannot_hold_is_refused_before_anything_is_written",)),
    Breakage("a store file deleted while DALI reads is a pipeline traceback", "dalipipe/loading/dali_loader.py",
             "                if gone is not None:\n                    raise gone from None\n", "",
             (f"{T_STORE}::test_a_store_file_deleted_while_a_loader_reads_is_one_line_naming_it",)),
    Breakage("the sweep removes another machine's writers' temporary files", "dalipipe/data/decoded_store.py",
             "and parts[1] == _HOST", "",
             (f"{T_STORE}::test_the_sweep_leaves_the_temporary_files_of_running_writers_and_of_other_machines",)),
    Breakage("--no-cache keeps a store file of the right size with other bytes", "dalipipe/data/index.py",
             "not (cache and DecodedStore.holds(f, *shapes[i]))", "not DecodedStore.holds(f, *shapes[i])",
             (f"{T_STORE}::test_without_the_checks_memory_every_store_file_is_written_again",)),
    Breakage("a full disk in the default place stops the command instead of leaving the store out",
             "dalipipe/data/index.py", "    if problem and required:\n", "    if problem:\n",
             (f"{T_STORE}::test_where_the_user_did_not_choose_the_place_a_full_disk_only_costs_the_store",)),
    Breakage("a place the user chose that cannot hold the store only warns", "dalipipe/data/index.py",
             "    if problem and required:\n", "    if problem and False:\n",
             (f"{T_STORE}::test_a_store_the_disk_cannot_hold_is_refused_before_anything_is_written",)),
    Breakage("DALI's store reader does not shuffle, shard or pad as the PNG readers do", "dalipipe/loading/dali_loader.py",
             "fn.readers.numpy(files=[stored[i] for i in order], **reading, name=STORE_READER)",
             "fn.readers.numpy(files=[stored[i] for i in order], name=STORE_READER)",
             (f"{T_STORE}::test_the_store_gives_the_batches_of_the_pngs",
              f"{T_STORE}::test_a_shard_and_a_resumed_loader_read_the_store_as_the_pngs")),
    Breakage("DALI's store reader takes the files in index order, not pre-permuted as the PNG readers",
             "dalipipe/loading/dali_loader.py",
             "fn.readers.numpy(files=[stored[i] for i in order], **reading, name=STORE_READER)",
             "fn.readers.numpy(files=stored, **reading, name=STORE_READER)",
             (f"{T_STORE}::test_the_store_gives_the_batches_of_the_pngs",)),
    Breakage("on a GPU the store's batches are processed on the CPU (the mixed decoder's graph)",
             "dalipipe/loading/dali_loader.py",
             'decode_on = "mixed" if gpu and settings.decoder == "mixed" and stored is None else "cpu"',
             'decode_on = "mixed" if gpu and settings.decoder == "mixed" else "cpu"',
             ("tests/test_gpu_options.py::test_on_a_gpu_the_store_is_read_on_the_cpu_and_copied_once_a_batch",)),
    Breakage("the torch loader decodes the PNGs though the store holds them", "dalipipe/loading/loaders.py",
             "                       state=state, stored=stored)", "                       state=state)",
             (f"{T_STORE}::test_once_the_store_is_built_no_png_is_opened",)),
    Breakage("the check stores only the samples it does not remember", "dalipipe/data/index.py",
             "if f is not None and not (cache and DecodedStore.holds(f, *shapes[i]))}",
             "if f is not None and results[i] is None\n"
             "                and not (cache and DecodedStore.holds(f, *shapes[i]))}",
             (f"{T_STORE}::test_a_stored_file_holds_the_pngs_decoded_pixels",)),
    Breakage("a run saved before the decoded store resumes with it (its DALI state fits the PNG graph)",
             "dalipipe/config.py", '        d.setdefault("decode_once", False)\n', "",
             ("tests/test_resume_options.py::test_a_run_of_a_release_without_the_decoded_store_resumes_without_it",)),
    Breakage("the data-wait advice names the decoder where the store decodes nothing", "dalipipe/run/data_wait.py",
             "if gpu_dali and not machine.stored:", "if gpu_dali:",
             (f"{T_WAIT}::test_advice_names_the_settings_most_likely_to_help_on_the_machine_and_loader",)),
]


def scratch_copy() -> Path:
    """The checkout's files (tracked and new, not ignored) in a temporary folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    dest = Path(tempfile.mkdtemp(prefix="dalipipe-break-"))
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The repository's history, for the tests that read an earlier release from it (read only).
    (dest / ".git").symlink_to(ROOT / ".git")
    return dest


def environment(scratch: Path) -> dict:
    # The scratch copy's package first, for the tests and every command they start.
    return dict(os.environ, PYTHONPATH=str(scratch), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


def imports_from(scratch: Path) -> None:
    where = subprocess.run([sys.executable, "-c", "import dalipipe; print(dalipipe.__file__)"], cwd=scratch,
                           env=environment(scratch), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(scratch.resolve()):
        sys.exit(f"the tests would import dalipipe from {where}, not from the scratch copy {scratch}")


def run_tests(scratch: Path, tests: tuple[str, ...], workers: int) -> tuple[str, float]:
    """'caught', 'survived' or 'error: ...', and the seconds it took."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    if workers > 1:
        cmd += ["-n", str(workers)]
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=scratch, env=environment(scratch), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # pytest, its workers and every command they started (torchrun's ranks run under setsid, apart from its process group)
        processes.stop(proc.pid, dump=False)
        proc.communicate()
        return "caught (a test hung)", time.monotonic() - t
    finally:
        if proc.poll() is None:  # (this script interrupted)
            processes.stop(proc.pid, dump=False)
    took = time.monotonic() - t
    tail = (out + err).strip().splitlines()[-3:]
    r = proc
    if r.returncode == 0:
        return "survived", took
    # 1: a test failed; 2: pytest-xdist stopped at the first failure (-x)
    if r.returncode in (1, 2) and tail and " failed" in tail[-1]:
        return "caught", took
    text = out + err
    # Not the breakage's doing: a test named here that does not exist, or none collected.
    if r.returncode == 5 or "file or directory not found" in text or "not found:" in text:
        return f"error: pytest exit {r.returncode}: {' | '.join(tail)}", took
    # The broken code fails before any test runs (an import or a conftest raises): caught too.
    return "caught (the tests could not start)", took


def stale(b: Breakage) -> str:
    """Why an entry no longer applies to this checkout ('' where it does): its text does not occur exactly
    once in its file, or a test file it names is gone."""
    path = ROOT / b.file
    if not path.is_file():
        return f"{b.file}: no such file"
    n = path.read_text().count(b.old)
    if n != 1:
        return f"the text to break occurs {n} times in {b.file}"
    gone = [t for t in b.tests if not (ROOT / t.split("::")[0]).is_file()]
    return f"no such test file: {', '.join(gone)}" if gone else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only breakages whose name or file contains this text")
    ap.add_argument("--list", action="store_true", help="list the breakages and their tests, run nothing")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist processes per breakage (default 2)")
    ap.add_argument("--stale", action="store_true", help="list the entries whose text or tests moved, run nothing")
    args = ap.parse_args()
    chosen = [b for b in BREAKAGES if args.k.lower() in (b.name + " " + b.file).lower()]
    if args.stale:
        moved = [(b, why) for b in chosen if (why := stale(b))]
        for b, why in moved:
            print(f"{b.name}\n    {why}")
        print(f"{len(moved)} of {len(chosen)} entries stale")
        return 1 if moved else 0
    if args.list:
        for b in chosen:
            print(f"{b.name}\n    {b.file}; guarded by {', '.join(b.tests)}")
        return 0
    scratch = scratch_copy()
    imports_from(scratch)
    results = []
    try:
        for k, b in enumerate(chosen, 1):
            path = scratch / b.file
            original = path.read_text()
            if stale(b):
                outcome, took = f"stale: {stale(b)}", 0.0
            else:
                path.write_text(original.replace(b.old, b.new))
                try:
                    outcome, took = run_tests(scratch, b.tests, args.workers)
                finally:
                    path.write_text(original)
            results.append((b, outcome))
            print(f"[{k}/{len(chosen)}] {outcome:<9} {took:6.0f} s  {b.name}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    caught = sum(o.startswith("caught") for _, o in results)
    print(f"\n{len(results)} breakages tried: {caught} caught, {len(results) - caught} not")
    for b, outcome in results:
        if not outcome.startswith("caught"):
            print(f"  {outcome}: {b.name} ({b.file})")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
