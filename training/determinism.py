"""``deterministic=true``: the same command reproduces its losses bit for bit.

Where two runs of the same command drifted apart (measured on CPU, demo config: first at step 4, in
the 8th digit): the backward of an advanced-index gather, ``table[index]`` (the encoder's position
embedding, model/autoencoder.py), is ``index_put_(accumulate=True)``. On CPU, for float tensors of
32k elements or more and more than one thread, PyTorch runs it as a parallel loop of atomic float
adds, whose order (so whose rounding) changes from run to run; the gradient of ``pos_embed`` was the
only one to differ after the first step. ``torch.use_deterministic_algorithms`` makes it serial.
Everything else was found reproducible as it is: the data order and each sample's random choices
are seeded (data_pipeline), the posterior noise has its own checkpointed generator (train.py), and
matmuls and oneDNN convolutions gave the same bits across processes.

On GPUs the same switch selects deterministic kernels where PyTorch has them (and raises for an op
that has none, naming it); cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first use, and cuDNN
must not benchmark. Two ops of the stage-1 path have no deterministic CUDA backward: the antialiased
bilinear resize (the encoder's position table, the perceptual loss's input) and reflection padding
(ST-LPIPS' blur-pool). Under this mode on CUDA they run as equivalents that have one (matmuls with
the resize's filter matrices; slices, flips and a cat), ``model/resample.py``, tested equal on CPU.
Outside PyTorch's switch (they would not raise, they would drift): the ``flash_attn`` attention
backend's backward is deterministic only when called with ``deterministic=True``, and gsplat's
rasterizer backward (3D stages) accumulates with atomics. PyTorch's own flash/efficient SDPA kernels
(``torch_varlen``) follow the switch.
"""
from __future__ import annotations

import os

import torch


def enable() -> None:
    """Deterministic kernels for the rest of the process. Call before building anything."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first use
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.mkldnn.deterministic = True  # oneDNN (CPU convolutions): its deterministic mode
