"""Time one training step of AToken at several parallel layouts: TP 1 vs 2 (with and without sequence
parallelism) x DeepSpeed ZeRO 1, 2, 3.

    torchrun --nproc_per_node 2 benchmarks/parallel_step.py                     # CPU: gloo, tiny model
    torchrun --nproc_per_node 8 benchmarks/parallel_step.py --model so400m \\
        --tokens 16384 --layouts tp1,tp2,tp2sp,tp4sp                           # a GPU node: NCCL, bf16

Each layout runs in the same process group, one after another: megatron's parallel state
(``training.parallelize.init_parallel``), the plain model parallelized by the trainer's own
``training.parallelize.parallelize`` (TP/SP, activation checkpointing, a DeepSpeed engine: torch
AdamW, clipping, ZeRO stage), and a fixed packed micro-batch
of mixed-resolution images per data-parallel rank (``--tokens`` tokens exactly; the TP ranks of a
group share it). A step is the trainer's own ``training.train.micro_step`` (what ``train_step`` runs once per
micro-batch) with ``mix_rounds=1``: forward, the trainer's ``Objective`` (by default with LPIPS
and Gram weighted 0, so 0.2 * L1 + 1e-8 * KL, though the perceptual net still runs; ``--lpips``
gives them the paper's weights), backward, the optimizer step. After ``--warmup`` steps, ``--steps`` steps are timed,
each between barriers; with
``--rounds R`` the whole list of layouts runs R times and the timed steps are pooled.

Measured per layout:

- step time: per step the slowest rank's wall time; the median over the timed steps (of all rounds);
- tokens/s: real tokens of the global batch (``dp * --tokens``) over the median step time;
- peak memory per rank: bytes of tensors allocated by torch, above what was live before the layout
  was built (so: weights, gradients, optimizer state, DeepSpeed buffers, activations). CUDA:
  ``torch.cuda.max_memory_allocated`` over the timed steps. CPU: the profiler's memory events
  (every CPU allocation and free) over the build and the warm-up; the peak inside the last warm-up
  step; ``state`` is the same count at the start of that step. Also on CPU (Linux), the growth of the
  resident set over the timed steps: the pages touched (an allocated but untouched buffer costs none);
- communication per step per rank: every call to a torch.distributed collective during the timed
  steps (megatron's and DeepSpeed's ``deepspeed.comm`` both end in them), as ``payload`` (the bytes
  of the tensors handed to the call: all-reduce its tensor, all-gather its output, reduce-scatter
  its input) and ``wire`` (what one rank sends under ring algorithms: all-reduce 2(n-1)/n of the
  payload, the others (n-1)/n, for a group of n ranks), split by group (``tp``, ``dp``, ``world``).

Rank 0 prints a table and writes JSON (``benchmarks/results/parallel_step_<device>.json`` unless
``--out``): device, load average, versions, the command line, per-layout results and ratios against
the first layout (by default tp1 / ZeRO 1).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import inspect
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.profiler import ProfilerActivity, profile

# ------------------------------------------------------------------ communication volume


def _ring(n: int) -> float:
    return (n - 1) / n


def _ring_all_reduce(n: int) -> float:
    return 2 * (n - 1) / n


# op -> (the argument whose tensor(s) are the payload, f): one rank sends f(n) * payload bytes in a
# group of n ranks under ring algorithms (send: all of it; recv: nothing).
COLLECTIVES = {
    "all_reduce": ("tensor", _ring_all_reduce),
    "all_reduce_coalesced": ("tensors", _ring_all_reduce),
    "all_gather": ("tensor_list", _ring),
    "all_gather_into_tensor": ("output_tensor", _ring),
    "all_gather_single": ("output_tensor", _ring),  # torch 2.14's name for all_gather_into_tensor
    "_all_gather_base": ("output_tensor", _ring),
    "all_gather_coalesced": ("output_tensor_lists", _ring),
    "reduce_scatter": ("input_list", _ring),
    "reduce_scatter_tensor": ("input", _ring),
    "_reduce_scatter_base": ("input", _ring),
    "reduce_scatter_single": ("input", _ring),
    "broadcast": ("tensor", _ring),
    "reduce": ("tensor", _ring),
    "all_to_all": ("input_tensor_list", _ring),
    "all_to_all_single": ("input", _ring),
    "gather": ("tensor", _ring),
    "gather_single": ("tensor", _ring),
    "gather_into_tensor": ("tensor", _ring),
    "scatter": ("tensor", _ring),
    "send": ("tensor", lambda n: 1.0),
    "isend": ("tensor", lambda n: 1.0),
    "recv": ("tensor", lambda n: 0.0),
    "irecv": ("tensor", lambda n: 0.0),
}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter:
    """Counts the collectives passed through ``torch.distributed`` between ``start()`` and ``stop()``.

    ``install()`` replaces the functions in ``torch.distributed`` and ``distributed_c10d``; it must run
    before megatron-core is imported (its ``tensor_parallel`` modules bind ``all_gather_into_tensor``
    and ``reduce_scatter_tensor`` at import) and before DeepSpeed initialises its comm backend (which
    binds them when ``deepspeed.initialize`` first runs). ``check_bound()`` verifies both did.
    Only the outermost call is counted (``_all_gather_base`` calls ``all_gather_into_tensor``);
    object collectives (``all_gather_object``, ...) are not wrapped: their tensor calls are counted.
    """

    def __init__(self):
        self.on = False
        self.stats: dict[str, dict[str, float]] = {}  # "group/op" -> calls, payload, wire
        self.labels: dict[int, tuple[str, int]] = {}  # id(group) -> (label, size)
        self.ranks: dict[str, list[int]] = {}
        self._depth = threading.local()

    def install(self) -> None:
        for name, (arg, factor) in COLLECTIVES.items():
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            wrapper = self._wrap(orig, name, arg, factor)
            for mod in (dist, c10d):
                if getattr(mod, name, None) is orig:
                    setattr(mod, name, wrapper)

    def _wrap(self, fn, name: str, arg: str, factor):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if self.on and depth == 0:
                bound = sig.bind_partial(*args, **kwargs).arguments
                self._add(name, bound.get("group"), _nbytes(bound.get(arg)), factor)
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        counted._bench_counted = True
        return counted

    def set_layout(self, tp_group, dp_group) -> None:
        """Name groups by their ranks: ``tp``, ``dp`` or ``world`` (all ranks), else ``other``."""
        self.labels.clear()
        self.ranks = {"tp": dist.get_process_group_ranks(tp_group), "dp": dist.get_process_group_ranks(dp_group),
                      "world": list(range(dist.get_world_size()))}

    def _label(self, group) -> tuple[str, int]:
        key = id(group)
        if key not in self.labels:
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            label = next((k for k, v in self.ranks.items() if v == ranks), "other")
            self.labels[key] = (label, len(ranks))
        return self.labels[key]

    def _add(self, name: str, group, payload: int, factor) -> None:
        label, n = self._label(group)
        s = self.stats.setdefault(f"{label}/{name}", {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0})
        s["calls"] += 1
        s["payload_bytes"] += payload
        s["wire_bytes"] += factor(n) * payload if n > 1 else 0.0

    def start(self) -> None:
        self.stats = {}
        self.on = True

    def stop(self) -> None:
        self.on = False

    def check_bound(self) -> None:
        """Raise if megatron or DeepSpeed holds an unwrapped all-gather / reduce-scatter."""
        from deepspeed.comm import comm as ds_comm  # noqa: PLC0415 - binds collectives: after COMM.install()
        from megatron.core.tensor_parallel import layers, mappings  # noqa: PLC0415 - binds collectives: after COMM.install()

        bound = {"megatron mappings all-gather": mappings.dist_all_gather_func,
                 "megatron mappings reduce-scatter": mappings.dist_reduce_scatter_func,
                 "megatron layers all-gather": layers.dist_all_gather_func,
                 "megatron layers reduce-scatter": layers.dist_reduce_scatter_func}
        if ds_comm.cdb is not None and hasattr(ds_comm.cdb, "all_gather_function"):
            bound["deepspeed all-gather"] = ds_comm.cdb.all_gather_function
            bound["deepspeed reduce-scatter"] = ds_comm.cdb.reduce_scatter_function
        missed = [k for k, f in bound.items() if not getattr(f, "_bench_counted", False)]
        if missed:
            raise RuntimeError(f"collectives bound before CommCounter.install(), not counted: {missed}")


# megatron-core 0.16 and DeepSpeed 0.19 call the collectives torch 2.14 renamed, on every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

COMM = CommCounter()
COMM.install()  # NOTE: before anything imports megatron-core or initialises DeepSpeed (see above)

from atoken.model import AToken, PackedBatch, preset  # noqa: E402 - after COMM.install() (above)
from atoken.model.losses import LossConfig  # noqa: E402 - after COMM.install() (above)
from atoken.model.objective import Objective  # noqa: E402 - after COMM.install() (above)
from atoken.training import distributed  # noqa: E402 - after COMM.install() (above)
from atoken.training.config import RunConfig  # noqa: E402 - after COMM.install() (above)
from atoken.training.engine import precision  # noqa: E402 - after COMM.install() (above)
from atoken.training.parallelize import init_parallel, parallelize, prepare_loss  # noqa: E402 - after COMM.install() (above)
from atoken.training.train import micro_step  # noqa: E402 - after COMM.install() (above)
from common import (  # noqa: E402 - after COMM.install() (above)
    cpu_info,
    cpu_model,
    device_slug,
    git_state,
    image_sizes,
    packed_batch,
    proc_status_bytes,
    sync,
    write_report,
)

# ------------------------------------------------------------------ peak memory


class CpuMemory:
    """torch's CPU allocations from the profiler's memory events, and the resident set (Linux).

    Allocations: byte deltas summed in time order from a window opened before the layout is built
    and closed after the warm-up; the peak inside the last warm-up step. (A free of a block
    allocated before the window is not reported: the profiler never saw its size. Hence the window
    opens before the build.) Resident set: ``VmHWM`` over the timed steps (reset through
    ``/proc/self/clear_refs``, after ``malloc_trim``) above ``VmRSS`` before the build: pages
    actually touched, which an allocation of untouched memory does not raise on the CPU.
    """

    MARK = "bench_measured_step"

    def __init__(self):
        self.rss_base = _resident_reset()
        self.result: dict = {}
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def step(self):
        return torch.profiler.record_function(self.MARK)

    def warmup_done(self) -> None:
        self.prof.__exit__(None, None, None)
        events = self.prof.profiler.kineto_results.events()
        mark = [e for e in events if e.name() == self.MARK][-1]
        mem = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = peak = state = largest = 0
        for t, nbytes in mem:
            if t > mark.end_ns():
                break
            live += nbytes
            if t < mark.start_ns():
                state = peak = live
            else:
                peak, largest = max(peak, live), max(largest, nbytes)
        self.result = {"peak_bytes": peak, "state_bytes": state, "largest_step_alloc_bytes": largest}
        del self.prof, events
        _resident_reset()

    def timed_start(self) -> None:
        pass

    def finish(self) -> dict:
        hwm = proc_status_bytes("VmHWM")
        return {**self.result, "resident_peak_growth_bytes": None if hwm is None else hwm - self.rss_base}


def _resident_reset() -> int | None:
    """Free what can be freed, hand the heap's free pages back, reset the peak: -> VmRSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except (OSError, AttributeError):
        return None
    return proc_status_bytes("VmRSS")


class CudaMemory:
    """torch.cuda's allocator statistics: peak over the timed steps, relative to before the build."""

    def __init__(self):
        gc.collect()
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        self.state = 0

    def step(self):
        return nullcontext()

    def warmup_done(self) -> None:
        pass

    def timed_start(self) -> None:
        torch.cuda.synchronize()
        self.state = torch.cuda.memory_allocated() - self.base
        torch.cuda.reset_peak_memory_stats()

    def finish(self) -> dict:
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - self.base, "state_bytes": self.state,
                "reserved_peak_bytes_total": torch.cuda.max_memory_reserved()}


# ------------------------------------------------------------------ one layout


@dataclass(frozen=True)
class Layout:
    tp: int
    sequence_parallel: bool
    zero: int

    def name(self, dp: int) -> str:
        return f"tp{self.tp}{'_sp' if self.sequence_parallel else ''}_dp{dp}_zero{self.zero}"


def parse_layouts(text: str) -> list[tuple[int, bool]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"tp(\d+)(sp)?", item.strip())
        if not m:
            raise argparse.ArgumentTypeError(f"layout {item!r} is not tpN or tpNsp (e.g. tp1,tp2,tp2sp)")
        out.append((int(m.group(1)), bool(m.group(2))))
    return out


def run_layout(layout: Layout, args, model_cfg, batches: dict[int, PackedBatch], device) -> dict:
    """Build, warm up (measuring CPU memory), time; this rank's numbers."""
    dims = init_parallel(tp=layout.tp, sequence_parallel=layout.sequence_parallel, seed=args.seed)
    COMM.set_layout(dims.tp_group, dims.dp_group)
    batch = batches[dims.dp_rank]  # KeyError: a layout not in megatron's rank order
    memory = CudaMemory() if device.type == "cuda" else CpuMemory()
    torch.manual_seed(args.seed)  # the same weights on every rank
    model = AToken(model_cfg)
    run = RunConfig(model=model_cfg, steps=10**6, precision=args.precision, seed=args.seed)
    run.parallel = replace(run.parallel, tp=layout.tp, sequence_parallel=layout.sequence_parallel,
                           zero_stage=layout.zero, activation_checkpointing=args.activation_checkpointing)
    engine = parallelize(model, dims, run, device)
    # This rank's (TP-local) parameters; ZeRO-3 keeps only a partition of each, ``ds_numel`` is the whole.
    param_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    COMM.check_bound()
    # The trainer's objective. The CLIP term needs a teacher and has its own benchmark (clip_term.py).
    loss_cfg = LossConfig(clip_weight=0.0) if args.lpips else LossConfig(lpips_weight=0.0, gram_weight=0.0,
                                                                           clip_weight=0.0)
    objective = Objective(loss_cfg).to(device)
    prepare_loss(objective, run, device)  # the perceptual net as the trainer runs it
    noise = torch.Generator(device).manual_seed(args.seed + 1 + dims.dp_rank)  # shared by the TP ranks
    amp = precision(run, device)
    extras = [{}] * batch.num_samples

    def step() -> torch.Tensor:
        return micro_step(engine, objective, batch, extras, ("rec",), noise, amp)["total"].detach()  # noqa: F821 - deleted after the last step

    for i in range(args.warmup):
        with memory.step() if i == args.warmup - 1 else nullcontext():
            step()
    memory.warmup_done()
    memory.timed_start()
    load_1min = os.getloadavg()[0]
    times, comms = [], []
    for _ in range(args.steps):
        sync(device)
        dist.barrier()
        COMM.start()
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
        COMM.stop()
        comms.append(COMM.stats)
    mem = memory.finish()
    last = comms[-1]

    def payloads(stats: dict) -> dict:
        return {k: v["payload_bytes"] for k, v in stats.items()}

    comm = {"payload_bytes": sum(v["payload_bytes"] for v in last.values()),
            "wire_bytes": sum(v["wire_bytes"] for v in last.values()),
            "calls": sum(v["calls"] for v in last.values()),
            "same_every_timed_step": all(payloads(c) == payloads(last) for c in comms), "by_op": last}
    result = {"dp_rank": dims.dp_rank, "tp_rank": dims.tp_rank, "dp": dims.dp, "tokens": batch.num_tokens,
              "step_times_s": times, "loss": float(loss), "param_bytes": param_bytes, "memory": mem, "comm": comm,
              "load_1min": load_1min}
    del engine, model, objective
    gc.collect()
    return result


def summarise(layout: Layout, rounds: list[list[dict]], tokens_per_dp_rank: int) -> dict:
    """One layout's results from every rank, in each round: step times pooled over the rounds,
    memory and communication from the last."""
    per_rank = rounds[-1]
    dp = per_rank[0]["dp"]
    # per round, per step, the slowest rank
    by_round = [[max(ts) for ts in zip(*(r["step_times_s"] for r in ranks), strict=True)] for ranks in rounds]
    steps = [t for ts in by_round for t in ts]
    median = statistics.median(steps)
    return {
        "name": layout.name(dp), "tp": layout.tp, "dp": dp, "sequence_parallel": layout.sequence_parallel,
        "zero": layout.zero,
        "step_time_s": {"median": median, "min": min(steps), "max": max(steps),
                        "median_per_round": [statistics.median(ts) for ts in by_round], "per_step_per_round": by_round},
        "tokens_per_step": dp * tokens_per_dp_rank, "tokens_per_s": dp * tokens_per_dp_rank / median,
        "peak_memory_bytes_per_rank": [r["memory"]["peak_bytes"] for r in per_rank],
        "state_memory_bytes_per_rank": [r["memory"]["state_bytes"] for r in per_rank],
        "memory_detail_per_rank": [r["memory"] for r in per_rank],
        "param_bytes_per_rank": [r["param_bytes"] for r in per_rank],
        "comm_per_step_per_rank": [r["comm"] for r in per_rank],
        # plausibility: ZeRO 1/2 move about 2x the parameter bytes over DP (gradient reduction, then
        # the updated partitions gathered); ZeRO-3 adds the forward (and backward) parameter gathers
        "dp_payload_over_param_bytes": [_by_group(r["comm"])["dp"] / r["param_bytes"] for r in per_rank],
        "loss_per_rank": [r["loss"] for r in per_rank],
        "load_average_1min_per_round": [ranks[0]["load_1min"] for ranks in rounds],
    }


def add_ratios(results: list[dict]) -> None:
    base = results[0]

    def mean(x):
        return sum(x) / len(x)

    for r in results:
        r["vs_baseline"] = {
            "baseline": base["name"],
            "step_time": r["step_time_s"]["median"] / base["step_time_s"]["median"],
            "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
            "peak_memory_max_rank": max(r["peak_memory_bytes_per_rank"]) / max(base["peak_memory_bytes_per_rank"]),
            "comm_wire_mean_rank": _ratio(mean([c["wire_bytes"] for c in r["comm_per_step_per_rank"]]),
                                          mean([c["wire_bytes"] for c in base["comm_per_step_per_rank"]])),
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# ------------------------------------------------------------------ report


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p, nccl = torch.cuda.get_device_properties(device), torch.cuda.nccl.version()
        return {"type": "cuda", "name": p.name, "memory_bytes": p.total_memory, "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                "gpus_per_node": torch.cuda.device_count(), "host_cpu": cpu_model()}
    return cpu_info()


def command_line() -> str:
    """The launcher's command line when torchrun is our parent, else ours."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
        if any(Path(a).name == "torchrun" or a == "torch.distributed.run" for a in parent[:3]):
            return shlex.join(parent)
    except OSError:
        pass
    return shlex.join([sys.executable, *sys.argv])


def versions() -> dict:
    import deepspeed  # noqa: PLC0415 - binds collectives: after COMM.install()

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron_core": version("megatron-core"), **git_state()}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _by_group(comm: dict) -> dict[str, int]:
    """Payload bytes per group label (``tp``, ``dp``, ``world``, ``other``)."""
    out = {"tp": 0, "dp": 0}
    for key, v in comm["by_op"].items():
        group = key.split("/")[0]
        out[group] = out.get(group, 0) + v["payload_bytes"]
    return out


def table(results: list[dict]) -> str:
    resident = all(m.get("resident_peak_growth_bytes") is not None
                   for r in results for m in r["memory_detail_per_rank"])
    head = ["layout", "ZeRO", "step (s)", "tokens/s", "x base", "peak mem/rank (MiB)", "x base", "state (MiB)"]
    head += ["resident growth (MiB)"] if resident else []
    head += ["comm wire/rank/step (MiB)", "x base", "payload tp / dp (MiB)", "calls"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        c, ratio = r["comm_per_step_per_rank"], r["vs_baseline"]
        wire, groups = ratio["comm_wire_mean_rank"], _by_group(c[0])
        cells = [f"tp{r['tp']}{' sp' if r['sequence_parallel'] else ''} dp{r['dp']}", str(r["zero"]),
                 f"{r['step_time_s']['median']:.3f}", f"{r['tokens_per_s']:.0f}", f"{ratio['tokens_per_s']:.2f}",
                 mib(max(r["peak_memory_bytes_per_rank"])), f"{ratio['peak_memory_max_rank']:.2f}",
                 mib(max(r["state_memory_bytes_per_rank"]))]
        if resident:
            cells.append(mib(max(m["resident_peak_growth_bytes"] for m in r["memory_detail_per_rank"])))
        cells += [mib(sum(x["wire_bytes"] for x in c) / len(c)), "-" if wire is None else f"{wire:.2f}",
                  f"{mib(groups['tp'])} / {mib(groups['dp'])}", str(c[0]["calls"])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "base", "so400m"], help="model preset (default tiny)")
    p.add_argument("--depth", type=int, help="override the encoder's and the decoder's depth (shrink a preset)")
    p.add_argument("--tokens", type=int, default=1024,
                   help="tokens of the packed micro-batch of each data-parallel rank (default 1024)")
    p.add_argument("--min-res", type=int, default=64, help="smallest longer side of an image, px (default 64)")
    p.add_argument("--max-res", type=int, default=512,
                   help="largest longer side, px (default 512; capped so one square image fits in --tokens)")
    p.add_argument("--layouts", type=parse_layouts, default=parse_layouts("tp1,tp2,tp2sp"),
                   help="comma-separated tpN or tpNsp (sequence parallel); DP = world / N (default tp1,tp2,tp2sp)")
    p.add_argument("--zero", default="1,2,3", help="comma-separated ZeRO stages (default 1,2,3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first, >= 2: the optimizer state appears in the first (default 2)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default 8)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of layouts this many times, pooling the timed steps: spreads each "
                        "layout over time on a shared machine whose load drifts (default 1)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (as training)")
    p.add_argument("--lpips", action="store_true",
                   help="the whole image loss (LPIPS + Gram; needs the perceptual weights, not parallel)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/parallel_step_<device>.json)")
    args = p.parse_args(argv)
    args.zero = [int(z) for z in args.zero.split(",")]
    if any(z not in (1, 2, 3) for z in args.zero) or args.warmup < 2 or min(args.steps, args.rounds) < 1:
        p.error("--zero takes stages 1, 2, 3; --warmup needs >= 2, --steps and --rounds >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command, started = command_line(), datetime.now(UTC)
    info = distributed.init()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    world = info.world_size
    for tp, _ in args.layouts:
        if world % tp:
            raise SystemExit(f"tp={tp} does not divide the world size {world}")
    model_cfg = preset(args.model)
    if args.depth:
        model_cfg = replace(model_cfg, encoder=replace(model_cfg.encoder, depth=args.depth),
                            decoder=replace(model_cfg.decoder, depth=args.depth))
    with torch.device("meta"):
        params_total = sum(p.numel() for p in AToken(model_cfg).parameters())
    # Per data-parallel rank its own images; this rank builds those of the DP ranks it will be
    # (megatron's order: the TP ranks of a group are consecutive, so DP rank = rank // tp).
    sizes = {r: image_sizes(args.tokens, args.seed + r, args.min_res, args.max_res)
             for r in range(max(world // tp for tp, _ in args.layouts))}
    dp_ranks = {info.rank // tp for tp, _ in args.layouts}
    batches = {r: packed_batch(sizes[r], args.seed + r).to(info.device) for r in dp_ranks}
    load_start = os.getloadavg()
    layouts = [Layout(tp, sp, z) for tp, sp in args.layouts for z in args.zero]
    runs: dict[Layout, list[list[dict]]] = {layout: [] for layout in layouts}
    for round_ in range(args.rounds):
        for layout in layouts:
            t0 = time.perf_counter()
            per_rank = [None] * world
            dist.all_gather_object(per_rank, run_layout(layout, args, model_cfg, batches, info.device))
            runs[layout].append(per_rank)
            if info.is_main:
                r = summarise(layout, [per_rank], args.tokens)
                print(f"[bench] round {round_ + 1}/{args.rounds} {r['name']}: step {r['step_time_s']['median']:.3f} s, "
                      f"{r['tokens_per_s']:.0f} tokens/s, peak {mib(max(r['peak_memory_bytes_per_rank']))} MiB/rank, "
                      f"comm {mib(r['comm_per_step_per_rank'][0]['wire_bytes'])} MiB/step on rank 0 "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results = [summarise(layout, rounds, args.tokens) for layout, rounds in runs.items()]
    add_ratios(results)
    if info.is_main:
        dev = device_info(info.device)
        report = {
            "benchmark": "parallel_step",
            "timestamp": started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "device": dev,
            "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
            "world_size": world,
            "backend": dist.get_backend(),
            "versions": versions(),
            "settings": {"model": args.model, "depth": args.depth, "params_total": params_total,
                         "param_bytes_total_fp32": 4 * params_total,
                         "tokens_per_dp_rank": args.tokens, "warmup": args.warmup, "timed_steps": args.steps,
                         "rounds": args.rounds,
                         "precision": args.precision, "lpips": args.lpips,
                         "activation_checkpointing": args.activation_checkpointing,
                         "image_sizes_per_dp_rank": {r: [f"{h}x{w}" for h, w in s] for r, s in sizes.items()}},
            "results": results,
        }
        out = write_report(report, args.out, f"parallel_step_{device_slug(dev)}.json")
        print(table(results))
        print(f"[bench] wrote {out}")
    distributed.shutdown()


if __name__ == "__main__":  # NOTE: required under torchrun (megatron's dist_checkpointing hangs without it)
    main()
