"""efficientnet-b1 from efficientnet-pytorch, sized to the classes of the labels file."""

from __future__ import annotations

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


def build_model(num_classes: int, weights: str | None = None, pretrained: bool = False) -> nn.Module:
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
        return EfficientNet.from_name(MODEL_NAME, num_classes=num_classes, batch_norm_momentum=SCRATCH_BN_MOMENTUM)
    model = EfficientNet.from_name(MODEL_NAME, num_classes=num_classes)
    load_backbone(model, weights)
    return model


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
