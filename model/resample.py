"""The antialiased bilinear resize and the reflection padding of the model and loss path, with the
forms that ``deterministic=true`` needs on CUDA.

PyTorch has no deterministic CUDA backward for ``F.interpolate(mode="bilinear")`` (antialiased or
not) nor for reflection padding: under ``torch.use_deterministic_algorithms(True)`` their backward
raises (the list of ops that throw, in ``torch.use_deterministic_algorithms``' documentation). Each
has an equivalent here built only from ops whose CUDA backward is deterministic:

- the resize as two matmuls with the separable filter matrices that ``antialias=True`` computes
  (``aa_matrix``), ``Wh @ x @ Ww^T``;
- reflection padding as slices, flips and a cat (their backward: copies, and sums of autograd).

They run where they are needed, on CUDA in deterministic mode (with or without a gradient: the
original and the reconstruction must go through the same op); everywhere else the original ops run,
so CPU numerics (and ``tests/golden``) are unchanged. ``training/determinism.py`` turns the mode on.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def deterministic_cuda(x: torch.Tensor) -> bool:
    """Whether ``x``'s ops must avoid the kernels without a deterministic CUDA backward."""
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


def _log_once(what: str) -> None:
    if what not in _logged and not torch.compiler.is_compiling():
        _logged.add(what)
        logger.info("deterministic mode on CUDA: %s", what)


def _aa_matrix_host(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    # The 1-D filter of antialias=True, read off PyTorch's own kernel: resizing the identity
    # [n_in, n_in] along its height alone (its width n_in -> n_in is the identity pass) gives M @ I.
    # NOTE: in the dtype it is used in: the kernel places its taps in that precision (a float32
    # filter differs from the exact float64 one by up to 1e-5).
    eye = torch.eye(n_in, dtype=dtype)[None, None]
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", antialias=True, align_corners=False)[0, 0]


def aa_matrix(n_in: int, n_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[n_out, n_in]: the antialiased bilinear resize of one axis (align_corners=False) as a matrix."""
    return _aa_matrix_cached(n_in, n_out, str(torch.device(device or "cpu")), dtype)


@functools.lru_cache(maxsize=256)
def _aa_matrix_cached(n_in: int, n_out: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return _aa_matrix_host(n_in, n_out, dtype).to(device)


def resize_aa_matmul(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size]: ``resize_aa``'s values as ``Wh @ x @ Ww^T`` (deterministic
    matmul backward; equal to the kernel's up to rounding). In x's dtype, outside autocast."""
    (h, w), (sh, sw) = x.shape[-2:], size
    wh, ww = aa_matrix(h, sh, x.device, x.dtype), aa_matrix(w, sw, x.device, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(torch.matmul(wh, x), ww.t())  # [B, C, sh, W] -> [B, C, sh, sw]


def resize_aa(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize (align_corners=False) of x [B, C, H, W] -> [B, C, size]."""
    if deterministic_cuda(x):
        _log_once("antialiased resize as matmuls with its filter matrices (model/resample.py)")
        return resize_aa_matmul(x, size)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def reflect_pad_cat(x: torch.Tensor, p: int) -> torch.Tensor:
    """[..., H, W] -> [..., H + 2p, W + 2p]: ``F.pad(x, (p,) * 4, mode="reflect")`` from slices, flips
    and cats (p < H, W), whose CUDA backward is deterministic."""
    x = torch.cat([x[..., 1:p + 1].flip(-1), x, x[..., -p - 1:-1].flip(-1)], -1)
    return torch.cat([x[..., 1:p + 1, :].flip(-2), x, x[..., -p - 1:-1, :].flip(-2)], -2)


def reflect_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Reflection padding of the last two dims by p on every side."""
    if deterministic_cuda(x):
        _log_once("reflection padding as slices, flips and a cat (model/resample.py)")
        return reflect_pad_cat(x, p)
    return F.pad(x, (p, p, p, p), mode="reflect")
