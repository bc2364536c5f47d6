"""What megatron-core needs to run without CUDA (CPU + gloo): the one place for it.

megatron-core calls a few ``torch.cuda`` functions unconditionally on paths we use
(docs/environment.md, "megatron-core on CPU"):

====================================  ==============================================================
call                                  where (megatron-core 0.16)
====================================  ==============================================================
``torch.cuda.current_device()``       device of the buffers it allocates: sequence-parallel
                                      all-gather / reduce-scatter outputs (``tensor_parallel.mappings``,
                                      the linear layers' backward), ``GlobalMemoryBuffer``,
                                      dist_checkpointing's failure flags
``torch.cuda.get_rng_state()``,       the RNG tracker (``tensor_parallel.random``:
``torch.cuda.manual_seed()``          ``CudaRNGStatesTracker.add``, ``model_parallel_cuda_manual_seed``)
``random._get_cuda_rng_state``,       the tracker's ``fork()``; the setter defers through
``random._set_cuda_rng_state``        ``torch.cuda._lazy_call``, so without CUDA it silently never runs
``torch.cuda.synchronize()``          dist_checkpointing save (``fully_parallel``, ``filesystem_async``)
====================================  ==============================================================

Without CUDA each of them raises, or silently does nothing. ``apply_if_no_cuda()`` points exactly
these at the CPU (the current device is the CPU, the "device RNG" is the CPU default generator,
``synchronize`` has nothing to wait for), and only as megatron-core sees them: the name ``torch``
inside the megatron modules that make these calls (``MODULES``) is bound to a stand-in that answers
these five ``torch.cuda`` functions and hands every other attribute to the real ``torch``. The
process' own ``torch.cuda`` is untouched (``torch.cuda.is_available()`` still answers False, and
``torch.cuda.current_device()`` elsewhere still raises). It patches nothing when CUDA is available,
and nothing on a second call. dist_checkpointing is not used by the trainer and is not patched.
"""
from __future__ import annotations

import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)

_patched: list[str] | None = None  # what the first call patched ([] when CUDA was available)


def _current_device() -> torch.device:
    return torch.device("cpu")


def _synchronize(device=None) -> None:
    """Nothing runs asynchronously on the CPU."""


def _get_rng_state(device="cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.default_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG states need CUDA")
    return torch.default_generator.get_state()


def _megatron_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG states need CUDA")
    torch.default_generator.set_state(new_state)


# The megatron-core modules whose ``torch.cuda`` calls are on our paths (layers, SP mappings, the
# RNG tracker, the global memory buffer, parallel state set-up).
MODULES = ("megatron.core.tensor_parallel.layers", "megatron.core.tensor_parallel.mappings",
           "megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel.utils", "megatron.core.utils",
           "megatron.core.parallel_state")
_CPU_CUDA = {"current_device": _current_device, "synchronize": _synchronize, "get_rng_state": _get_rng_state,
             "set_rng_state": _set_rng_state, "manual_seed": _manual_seed}


class _Overlay(types.ModuleType):
    """A module that answers ``overrides`` itself and everything else from ``real``."""

    def __init__(self, real: types.ModuleType, overrides: dict):
        super().__init__(real.__name__, real.__doc__)
        self.__dict__.update(overrides)
        self._real = real

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def apply_if_no_cuda() -> list[str]:
    """Redirect megatron-core's CUDA-only calls to the CPU when CUDA is absent; never on a GPU.

    Idempotent. Returns the names patched by the first call ([] if CUDA is available).
    """
    global _patched
    if _patched is not None:
        return _patched
    if torch.cuda.is_available():
        _patched = []
        return _patched
    torch_on_cpu = _Overlay(torch, {"cuda": _Overlay(torch.cuda, _CPU_CUDA)})
    _patched = []
    for name in MODULES:
        module = importlib.import_module(name)
        module.torch = torch_on_cpu
        _patched += [f"{name}: torch.cuda.{fn}" for fn in _CPU_CUDA]
    mrandom = importlib.import_module("megatron.core.tensor_parallel.random")
    mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = _megatron_get_rng_state, _megatron_set_rng_state
    _patched += [f"{mrandom.__name__}.{fn}" for fn in ("_get_cuda_rng_state", "_set_cuda_rng_state")]
    log.info("no CUDA: megatron-core's device, RNG and sync calls use the CPU, inside megatron only (%s)",
             ", ".join(MODULES))
    return _patched
