"""efficientnet-b1 from efficientnet-pytorch, sized to the classes of the labels file."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dalipipe.constants import MODEL_NAME
from dalipipe.errors import DataError

# efficientnet-pytorch builds BatchNorm with PyTorch momentum 0.01 (TensorFlow's 0.99). From scratch,
# the running statistics then lag so far behind that the model in eval mode predicts one class for
# everything after a short run (measured). 0.9 in the package's convention is PyTorch's usual 0.1.
# Pretrained weights keep the package default, as the reference did.
SCRATCH_BN_MOMENTUM = 0.9


def build_model(num_classes: int, *, weights: str | None = None, pretrained: bool = False) -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    if pretrained:
        try:
            return EfficientNet.from_pretrained(MODEL_NAME, num_classes=num_classes)
        except Exception as e:  # offline machines fail inside urllib with many error types
            raise DataError(
                f"--pretrained: could not download {MODEL_NAME} weights ({type(e).__name__}); "
                "download them on a connected machine and pass --weights PATH"
            ) from None
    if weights is None:
        model = EfficientNet.from_name(MODEL_NAME, num_classes=num_classes, batch_norm_momentum=SCRATCH_BN_MOMENTUM)
        init_like_reference(model)
        return model
    model = EfficientNet.from_name(MODEL_NAME, num_classes=num_classes)
    load_backbone(model, weights)
    return model


def init_like_reference(model: nn.Module) -> None:
    """The EfficientNet reference's initialization (TensorFlow's, and timm's _init_weight_goog), which
    efficientnet-pytorch lacks: it keeps PyTorch's defaults, with which a fresh model in eval mode loses
    about 40x of its activations' scale in every block, so that its logits come out the same for every
    input. Convolutions (efficientnet-pytorch's padded ones subclass nn.Conv2d): normal with std
    sqrt(2 / fan_out), fan_out = k*k*out_channels/groups; BatchNorm: weight 1, bias 0; the classifier:
    uniform in +-1/sqrt(in_features) (see below); every bias 0. Only for a model from scratch: pretrained
    weights and --weights replace these values."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear):
            # The reference's bound is 1/sqrt(out_features): +-0.03 for its 1,000 ImageNet classes, +-0.33
            # for our 9, which starts the logits ten times as spread (measured: a first epoch's loss 4.1
            # instead of 2.2 = ln 9). 1/sqrt(in_features) (1,280) keeps the reference's own scale.
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def load_backbone(model: nn.Module, path: str) -> None:
    """Load ImageNet weights from a local file, all but the classifier (its size is the class count)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--weights {p}: file not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"--weights {p}: not a torch state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"--weights {p}: not a torch state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise DataError(f"--weights {p}: does not fit {MODEL_NAME} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]})")


def compiled(module: nn.Module, model: nn.Module | None = None, backend: str = "inductor") -> nn.Module:
    """torch.compile'd `module` (the model, or its DDP wrapper with `model` inside). efficientnet-pytorch's
    memory-efficient swish is a custom autograd Function, at which older torch releases break the graph
    (torch 2.13 traces it: one graph either way, checked with torch._dynamo.explain); the plain swish
    (x * sigmoid(x), the same values) is plain tensor code that any release compiles whole."""
    (model or module).set_swish(memory_efficient=False)
    return torch.compile(module, backend=backend)
