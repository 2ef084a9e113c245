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
from dalipipe.loading.loaders import decode_cache_mb
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


@pytest.mark.parametrize("option", [["--precision", "fp16"], ["--precision", "bf16"], ["--decode-cache"],
                                    ["--decode-cache", "--loader", "torch"]])
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


def test_decoder_arguments_drop_jpeg_paddings_and_carry_the_cache():
    assert decoder_args("cpu", 0) == {} and decoder_args("cpu", 100) == {}
    assert decoder_args("mixed", 0) == {"device_memory_padding": 0, "host_memory_padding": 0}
    cached = decoder_args("mixed", 140)
    assert cached["cache_size"] == 140 and cached["cache_type"] == "threshold" and cached["cache_threshold"] == 0


def test_decode_cache_size_covers_every_decoded_channel():
    index = pd.DataFrame({"height": [64] * 9632, "width": [64] * 9632})
    mb = decode_cache_mb(index)
    # the challenge's set: three channels, each cached as RGB (about 340 MiB decoded)
    assert mb * 2**20 >= 9632 * 64 * 64 * 3 * 3 and mb < 450


def test_decode_cache_reaches_the_loader_settings_and_the_pipeline_refuses_it_without_a_gpu(small_synth):
    cfg = TrainConfig(images_dir="", labels_csv="", out_dir="", decode_cache=True)
    assert cfg.loader_settings(True, 0, 1, decode_cache_mb=50).decode_cache_mb == 50
    assert TrainConfig(images_dir="", labels_csv="", out_dir="").loader_settings(True, 0, 1, 50).decode_cache_mb == 0
    from dalipipe.config import AugmentSpec
    from dalipipe.data.index import PATH_COLUMNS, build_index

    paths = build_index(small_synth / "images_test")[PATH_COLUMNS].values.tolist()
    with pytest.raises(DataError, match="--decode-cache"):
        build_pipeline(paths, spec=AugmentSpec(image_size=16), norm=RAW, train=False, device_id=None,
                       settings=LoaderSettings(decode_cache_mb=50))


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


def test_with_the_decode_cache_each_channel_is_decoded_as_rgb_and_turned_gray_on_the_gpu():
    """DALI's decoder cache stores only RGB HWC decodes (a GRAY decode is never cached, so every epoch would
    decode again): with the cache the decoders ask for RGB and a GPU conversion gives the gray channel."""
    from nvidia.dali import types

    for mb, decoded_as, conversions in ((0, types.GRAY, 0), (50, types.RGB, 3)):
        ops = _graph(0, LoaderSettings(batch_size=4, decode_cache_mb=mb))
        decoders = [op for op in ops if op.name.strip("_").rsplit("_", 1)[0] == "Image"]
        assert len(decoders) == 3
        assert all(f"output_type: {int(decoded_as)}\n" in repr(op.spec) for op in decoders), mb
        assert all((f"cache_size: {mb}\n" in repr(op.spec)) == bool(mb) for op in decoders)
        converted = [op for op in ops if "ColorSpaceConversion" in op.name]
        assert len(converted) == conversions
        assert all(node.device == "gpu" for op in converted for node in op.outputs)


def test_gray_through_an_rgb_decode_equals_the_gray_decode_on_pngsuite():
    """What the cached path computes (DALI's CPU kernels here, the same operators as on a GPU): for every
    PngSuite file the data check accepts, gray PNGs exactly, colour PNGs within one level (the gray rule)."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    from dalipipe.data.pngio import _GRAY_MODES, read_gray
    from dalipipe.loading.dali_loader import rgb_to_gray
    from tests.conftest import pngsuite

    files, gray = [], []
    for path in sorted(pngsuite().glob("*.png")):
        try:
            read_gray(path)
        except DataError:
            continue  # refused by the data check: never reaches a loader
        files.append(str(path))
        gray.append(Image.open(path).mode in _GRAY_MODES)
    assert sum(gray) >= 20 and len(files) - sum(gray) >= 40

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        enc, _ = fn.readers.file(files=files)
        return (fn.decoders.image(enc, device="cpu", output_type=types.GRAY),
                rgb_to_gray(fn.decoders.image(enc, device="cpu", output_type=types.RGB)))

    p = pipe()
    p.build()
    for path, is_gray in zip(files, gray):
        direct, via_rgb = (np.asarray(out[0]).astype(int) for out in p.run())
        assert direct.shape == via_rgb.shape
        assert np.abs(direct - via_rgb).max() <= (0 if is_gray else 1), path
