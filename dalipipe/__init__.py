"""dalipipe: a cell-line classifier for three-channel fluorescence microscopy, fed by NVIDIA DALI."""

__version__ = "0.1.0"
