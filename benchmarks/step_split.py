"""Where a profiled training step's time goes: torch.profiler events sorted into the parts issue 23 names.

``labels(engine, objective, ema)`` puts ``record_function`` ranges around the parts from the benchmark
side (model/ stays free of benchmark code): the objective's reconstruction loss (unpatchify, resizes,
the perceptual net, Gram, L1), the perceptual net's own ``features`` calls inside it, DeepSpeed's
``engine.backward`` / ``engine.step`` and the EMA update. ``split(prof)`` then gives each event's
*self* time (device time on CUDA, CPU time on CPU) to one part:

  perceptual    ops inside the reconstruction-loss range, and their backward: the autograd nodes
                whose ``sequence_nr`` (per forward thread) a forward op in that range recorded
  optimizer     inside ``Optimizer.step`` (torch records it for every optimizer)
  ema           inside the EMA update
  deepspeed     DeepSpeed's own work: inside ``engine.backward`` / ``engine.step`` on the caller's
                thread but outside autograd's nodes and the optimizer (flattening, bucket copies,
                gradient reduction, zeroing), plus the ``AccumulateGrad`` nodes where ZeRO's gradient
                hooks copy into its buckets
  attention     the rest, by kernel/op name: flash / fmha / attention / sdpa / varlen kernels
  matmul        gemm / mm / nvjet / cutlass / conv kernels
  elementwise   everything else (norms, RoPE, GELU, residual adds, casts, Triton-fused passes)

The loader is not in the step (the trainer's loader copies one micro-batch ahead on a side stream):
its share is the trainer's own ``data_wait_fraction`` (gpu_trainer.py's train phase).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch.autograd.profiler import record_function

PARTS = ("perceptual", "optimizer", "ema", "deepspeed", "attention", "matmul", "elementwise")
REC, NET, BWD, STEP, EMA_RANGE = "atoken.rec_loss", "atoken.perceptual_net", "deepspeed.backward", "deepspeed.step", \
    "atoken.ema"
_ATTENTION = re.compile(r"flash|fmha|attention|attn|sdpa|varlen", re.I)
_MATMUL = re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|\bmm\b|aten::mm|addmm|bmm|matmul|linear|conv|cudnn", re.I)


def _wrap(fn, name: str):
    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapped


def _range_hooks(module: torch.nn.Module, name: str) -> None:
    """A ``record_function`` range around each forward of ``module`` (pre-hook opens, hook closes)."""
    open_ranges = []
    module.register_forward_pre_hook(lambda m, a: open_ranges.append(record_function(name).__enter__()))
    module.register_forward_hook(lambda m, a, o: open_ranges.pop().__exit__(None, None, None))


def labels(engine, objective, ema=None) -> list[str]:
    """Label the parts of a step in place; returns what was labelled (a renamed module drops out of
    the list instead of failing, and its time falls into the name-based parts)."""
    done = []
    rec = getattr(objective, "rec", None)
    if isinstance(rec, torch.nn.Module):
        _range_hooks(rec, REC)
        done.append("objective.rec")
        net = getattr(rec, "perceptual", None)
        if net is not None and hasattr(net, "features"):
            net.features = _wrap(net.features, NET)
            done.append("objective.rec.perceptual.features")
    engine.backward = _wrap(engine.backward, BWD)
    engine.step = _wrap(engine.step, STEP)
    done += ["engine.backward", "engine.step"]
    if ema is not None:
        ema.update = _wrap(ema.update, EMA_RANGE)
        done.append("ema.update")
    return done


def _ancestors(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def split(prof, cuda: bool) -> dict:
    """Fractions of the step's time per part (self device time on CUDA, self CPU time on CPU), with
    ``perceptual_fraction`` and the perceptual net's own share inside it (``perceptual_net_fraction``)."""
    events = prof.events()
    # Forward ops inside the reconstruction loss: their autograd nodes' sequence numbers, per thread.
    rec_seq = {(e.thread, e.sequence_nr) for e in events
               if e.sequence_nr >= 0 and any(a.name == REC for a in _ancestors(e))}
    net_seq = {(e.thread, e.sequence_nr) for e in events
               if e.sequence_nr >= 0 and any(a.name == NET for a in _ancestors(e))}
    times, net_t, total = defaultdict(float), 0.0, 0.0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:  # kernels: counted through the op that launched them
            continue
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t <= 0:
            continue
        chain = list(_ancestors(e))
        names = [a.name for a in chain]
        node = next((a for a in chain if a.name.startswith("autograd::engine::evaluate_function")), None)
        key = (node.fwd_thread, node.sequence_nr) if node is not None else None
        if REC in names or key in rec_seq:
            part = "perceptual"
            net_t += t if (NET in names or key in net_seq) else 0.0
        elif any(n.startswith("Optimizer.step") for n in names):
            part = "optimizer"
        elif EMA_RANGE in names:
            part = "ema"
        elif (node is not None and "AccumulateGrad" in node.name) or (node is None and (BWD in names or STEP in names)):
            part = "deepspeed"
        else:
            kernels = " ".join(k.name for k in e.kernels) if cuda else ""
            leaf = f"{e.name} {kernels}"
            part = "attention" if _ATTENTION.search(leaf) else "matmul" if _MATMUL.search(leaf) else "elementwise"
        times[part] += t
        total += t
    unit = "device" if cuda else "cpu"
    return {"time": f"self {unit} time of every profiled op, us", "total_us": total,
            "us": {p: times[p] for p in PARTS},
            "fractions": {p: times[p] / total if total else 0.0 for p in PARTS},
            "perceptual_fraction": times["perceptual"] / total if total else 0.0,
            "perceptual_net_fraction": net_t / total if total else 0.0,
            "loader": "not in the step: the trainer's data_wait_fraction (gpu_trainer.py train)"}
