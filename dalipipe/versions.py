"""The versions that made a checkpoint or a measurement, recorded beside it."""

from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict[str, str | None]:
    def of(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import torch

    dali = next((v for v in map(of, ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110")) if v), None)
    if dali is None:  # unpacked without its metadata (as on the lent GPU machines)
        try:
            import nvidia.dali

            dali = nvidia.dali.__version__
        except ImportError:
            pass
    # str(): torch.__version__ is a str subclass, which a weights_only load refuses.
    return {"dalipipe": of("dalipipe"), "torch": str(torch.__version__), "dali": str(dali) if dali else None,
            "efficientnet_pytorch": of("efficientnet-pytorch"), "python": platform.python_version()}
