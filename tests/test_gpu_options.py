"""The GPU-only options and choices, checked on the CPU: what reaches the pipeline and the optimizer, and
the one-line errors where a GPU is missing."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dalipipe import device as dev
from dalipipe.config import LoaderSettings, TrainConfig
from dalipipe.errors import DataError
from dalipipe.loading.dali_loader import build_pipeline, decoder_args
from dalipipe.run.train_setup import make_optimizer
from tests.test_cli import assert_one_line_error, dalipipe
from tests.test_loaders import RAW

GPU = torch.device("cuda", 0)  # a stand-in: nothing here runs on it


@pytest.mark.parametrize("precision,native_bf16,dtype,scaler", [
    ("auto", True, torch.bfloat16, False), ("auto", False, torch.float16, True),
    ("bf16", False, torch.bfloat16, False), ("fp16", True, torch.float16, True), ("fp32", True, None, False)])
def test_precision_picks_the_autocast_dtype_and_the_scaler(monkeypatch, precision, native_bf16, dtype, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    assert dev.amp_dtype(GPU, precision) == dtype
    assert dev.needs_grad_scaler(GPU, precision) == scaler


def test_precision_on_the_cpu_is_fp32_and_refuses_half_types():
    cpu = torch.device("cpu")
    assert dev.amp_dtype(cpu, "auto") is None and dev.amp_dtype(cpu, "fp32") is None
    for precision in ("fp16", "bf16"):
        with pytest.raises(DataError, match=f"--precision {precision} needs a CUDA GPU"):
            dev.amp_dtype(cpu, precision)


@pytest.mark.parametrize("option", [["--precision", "fp16"], ["--precision", "bf16"]])
def test_gpu_only_options_on_the_cpu_are_one_line_errors_before_any_work(small_synth, tmp_path, option):
    d = small_synth
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "run", "--device", "cpu",
                 *option, check=False)
    assert_one_line_error(r, option[0])
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_fused_adam_follows_the_device_the_run_continues_on():
    """load_state_dict restores the saved param groups' `fused` flag: a run started on the CPU and resumed
    on a GPU would keep unfused Adam without make_optimizer's fix (seen: fused stayed False)."""
    model = torch.nn.Linear(4, 3)
    cpu_opt = make_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    model(torch.randn(5, 4)).sum().backward()
    cpu_opt.step()
    saved = cpu_opt.state_dict()
    assert saved["param_groups"][0]["fused"] is False
    resumed = make_optimizer(model, 1e-3, 0.0, GPU, saved)
    assert all(g["fused"] is True and not g["foreach"] for g in resumed.param_groups)
    assert all(s["step"].dtype == torch.float32 for s in resumed.state.values())  # as the fused kernel needs
    # Back on the CPU the flag follows again, and the state is the saved one.
    back = make_optimizer(model, 1e-3, 0.0, torch.device("cpu"), resumed.state_dict())
    assert all(g["fused"] is False for g in back.param_groups)
    assert torch.equal(back.state[model.weight]["exp_avg"], cpu_opt.state[model.weight]["exp_avg"])


def test_decoder_arguments_drop_jpeg_paddings():
    assert decoder_args("cpu") == {}
    assert decoder_args("mixed") == {"device_memory_padding": 0, "host_memory_padding": 0}


@pytest.mark.parametrize("cuda,package", [(None, "nvidia-dali-cuda120"), ("12.6", "nvidia-dali-cuda120"),
                                          ("13.0", "nvidia-dali-cuda130")])
def test_dali_package_follows_the_cuda_of_torch(monkeypatch, cuda, package):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert dev.dali_package() == package


def test_loaders_do_not_import_the_module_that_imports_them():
    """loaders.py picks a loader; the loaders themselves depend only on what lies below them."""
    root = Path(__file__).resolve().parents[1] / "dalipipe" / "loading"
    for name in ("dali_loader.py", "torch_loader.py", "loader_rules.py"):
        tree = ast.parse((root / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "dalipipe.loading.loaders" not in imported, name


def test_augmentation_parameters_do_not_wait_for_the_decoded_images(small_synth):
    """The random crop, flip and rotation parameters are CPU operators. Fed from the decoded images' shape()
    they would, on a GPU, wait for the same batch's GPU decode (a GPU-to-CPU transition); read from the
    encoded file (peek_image_shape) they depend on the reader alone. Checked on the pipeline's graph."""
    from dalipipe.config import AugmentSpec
    from dalipipe.data.index import PATH_COLUMNS, build_index

    paths = build_index(small_synth / "images_test")[PATH_COLUMNS].values.tolist()
    pipe = build_pipeline(paths, spec=AugmentSpec(image_size=16), norm=RAW, train=True, device_id=None,
                          settings=LoaderSettings(batch_size=4))
    ops = {op.name: op for op in pipe._ops}

    def ancestors(name):
        out, todo = set(), [name]
        while todo:
            for node in ops[todo.pop()].inputs:
                if node.source is not None and node.source.name not in out:
                    out.add(node.source.name)
                    todo.append(node.source.name)
        return out

    (warp,) = [n for n in ops if "WarpAffine" in n]
    matrix = ops[warp].inputs[1].source.name  # the warp's matrix= argument
    upstream = ancestors(matrix)
    assert any("PeekImageShape" in n for n in upstream)
    assert not [n for n in upstream if "__Image" in n or "__Cat" in n], sorted(upstream)


def _graph(device_id, settings):
    """The operators of a pipeline's graph, defined (not built: a GPU pipeline needs no GPU for this)."""
    from dalipipe.config import AugmentSpec
    from dalipipe.loading.dali_loader import define_pipeline

    paths = [[f"/data/{i:05d}_{c}.png" for c in ("yellow", "red", "blue")] for i in range(4)]
    pipe = define_pipeline(paths, spec=AugmentSpec(image_size=16), norm=RAW, train=True, device_id=device_id,
                           settings=settings)
    pipe._build_graph()
    return pipe._ops


def test_on_a_gpu_the_store_is_read_on_the_cpu_and_copied_once_a_batch():
    """With the decoded store nothing is decoded: one CPU numpy reader, whose batch goes to the GPU in one copy,
    and the processing on the GPU as without the store."""
    from dalipipe.config import AugmentSpec
    from dalipipe.loading.dali_loader import define_pipeline

    stored = [f"/store/{i:05d}-abc.npy" for i in range(4)]
    paths = [[f"/data/{i:05d}_{c}.png" for c in ("yellow", "red", "blue")] for i in range(4)]
    pipe = define_pipeline(paths, spec=AugmentSpec(image_size=16), norm=RAW, train=True, device_id=0,
                           settings=LoaderSettings(batch_size=4), stored=stored)
    pipe._build_graph()
    ops = pipe._ops

    def kind(op):  # the operator's schema, as its spec names it: "OpSpec for readers__Numpy: ..."
        return repr(op.spec).split(":")[0].split()[-1]

    assert not [op for op in ops if kind(op) in ("decoders__Image", "readers__File")]  # no decoder, no PNG reader
    (reader,) = [op for op in ops if kind(op) == "readers__Numpy"]
    assert all(node.device == "cpu" for node in reader.outputs)
    warps = [op for op in ops if kind(op) == "WarpAffine"]
    assert warps and all(node.device == "gpu" for op in warps for node in op.outputs)
