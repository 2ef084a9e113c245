"""Model building: local weights, the offline --pretrained message, and the from-scratch BatchNorm fix."""

from __future__ import annotations

import pytest
import torch

from dalipipe.errors import DataError
from dalipipe.model import build_model


def test_local_weights_load_everything_but_the_classifier(tmp_path):
    donor = build_model(1000)
    with torch.no_grad():
        donor._conv_stem.weight.fill_(0.125)
    torch.save(donor.state_dict(), tmp_path / "imagenet.pth")
    model = build_model(9, weights=str(tmp_path / "imagenet.pth"))
    assert torch.all(model._conv_stem.weight == 0.125)
    assert model._fc.out_features == 9
    # Pretrained weights keep the package's BatchNorm momentum, as the reference did.
    assert model._bn0.momentum == pytest.approx(0.01)


def test_from_scratch_uses_pytorch_batchnorm_momentum():
    # The number PyTorch's BatchNorm reads (its default, 0.1), on every layer: not the package-convention
    # constant it is derived from, which is the thing that could be wrong.
    model = build_model(4)
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(momenta) > 40 and all(m == pytest.approx(0.1) for m in momenta), sorted(set(momenta))


def test_bad_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        build_model(4, weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a torch state dict"):
        build_model(4, weights=str(tmp_path / "junk.pth"))
    torch.save({"layer.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="does not fit efficientnet-b1"):
        build_model(4, weights=str(tmp_path / "other.pth"))


def test_pretrained_download_failure_is_a_clear_error(monkeypatch):
    import efficientnet_pytorch.utils as utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(utils.model_zoo, "load_url", offline)
    with pytest.raises(DataError, match="--pretrained: could not download .* pass --weights PATH"):
        build_model(4, pretrained=True)


def test_compiled_model_gives_the_eager_logits_in_one_graph():
    import torch._dynamo

    from dalipipe.model import compiled

    torch.manual_seed(0)
    model = build_model(4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        # aot_eager: dynamo's graph capture and AOTAutograd, as for the GPU, without inductor's minutes of
        # C++ compilation on a CPU.
        out = compiled(model, backend="aot_eager")(x)
    assert torch.allclose(out, eager, atol=1e-5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)  # the whole model in one graph
    assert explained.graph_break_count == 0 and explained.graph_count == 1
