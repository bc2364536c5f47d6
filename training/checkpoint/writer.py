"""Writing a checkpoint off the training step, durably.

The step is blocked only while ``snapshot`` copies the state off the live tensors (into pinned host
buffers on CUDA, reused from save to save; a plain copy on the CPU). A ``Writer`` then writes the
copies in one background thread: each file written, flushed and fsynced, then its directory
fsynced; the ranks agree that all of them wrote (a gloo all-reduce of a success flag on a group of
the writer's own), and only then global rank 0 renames the staging directory into place, fsyncs
the parent and moves ``latest`` (written, fsynced, renamed, the parent fsynced again). A kill at
any moment thus leaves ``latest`` naming a complete checkpoint. Old checkpoints are pruned in the
same thread, off the step.

Why a thread of our own, not torch DCP's ``async_save`` or DeepSpeed's decoupled engine: DCP would
write its own format, which DeepSpeed's ``load_checkpoint`` and ``ds_to_universal`` (resume at
another layout) cannot read; DeepSpeed's ``DecoupledCheckpointEngine`` forks writer processes that
need CUDA-shared tensors and commits ``latest`` without any fsync. DeepSpeed's checkpoint-engine
hook (``deepspeed_internals.snapshotting``) hands us the exact state dicts and file names it would
write, so the files stay DeepSpeed's own and every loader keeps working. Serialisation (pickling,
zip framing) and the disk are the slow part, and the thread runs them while the GIL is released in
the writes (torch's serialiser writes whole storages at a time).
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from atoken.model.errors import UserError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ durable files

def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, obj) -> int:
    """``torch.save`` (or text, for a str) to ``path``, flushed and fsynced. Returns the bytes written."""
    with open(path, "wb") as f:
        if isinstance(obj, str):
            f.write(obj.encode())
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically and durably: a temporary file fsynced, renamed over
    ``path``, then the directory fsynced (so the rename itself survives a crash)."""
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ------------------------------------------------------------------ the snapshot

class HostBuffers:
    """Pinned host buffers for device tensors, kept from one save to the next (pinning memory is
    slow: allocated once, reused while the shapes repeat). Unused on the CPU."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(t.shape), t.dtype)
        with self._lock:
            free = self._free[key]
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    def give_back(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            for b in bufs:
                self._free[(tuple(b.shape), b.dtype)].append(b)


def snapshot(obj, buffers: HostBuffers | None = None):
    """A copy of ``obj`` (nested dicts, lists, tuples) whose tensors no longer alias the live state:
    CPU tensors cloned, device tensors copied into ``buffers`` (pinned; the copies are complete when
    this returns). Other leaves are kept by reference (configs, numbers: not mutated in place). A
    tensor met twice is copied once, so ``torch.save`` still stores it once."""
    memo: dict[int, torch.Tensor] = {}
    on_device = []

    def go(x):
        if torch.is_tensor(x):
            key = id(x)
            if key not in memo:
                x = x.detach()
                if x.device.type == "cpu":
                    memo[key] = x.clone()
                elif buffers is None:
                    memo[key] = x.to("cpu", copy=True)
                else:
                    memo[key] = buffers.take(x)
                    on_device.append(x.device)
            return memo[key]
        if isinstance(x, np.ndarray):  # numpy's RNG state, a loader's position
            return x.copy()
        if isinstance(x, dict):
            out = copy.copy(x)  # keeps the dict's type (OrderedDict, defaultdict)
            for k, v in x.items():
                out[k] = go(v)
            return out
        if isinstance(x, list):
            return [go(v) for v in x]
        if isinstance(x, tuple):
            items = [go(v) for v in x]
            return type(x)._make(items) if hasattr(x, "_make") else tuple(items)
        return x

    out = go(obj)
    for device in set(on_device):
        torch.cuda.synchronize(device)  # the non-blocking copies have landed before the step goes on
    return out


def host_tensors(obj) -> list[torch.Tensor]:
    """The pinned tensors inside a snapshot (to give back to ``HostBuffers`` once written)."""
    out = []

    def go(x):
        if torch.is_tensor(x):
            if x.is_pinned():
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                go(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                go(v)

    go(obj)
    return out


# ------------------------------------------------------------------ the background writer

class Writer:
    """Writes one checkpoint at a time, in a background thread (``background=False``: in the
    caller, as the synchronous baseline the benchmark compares against).

    Every rank builds one at the same point (it creates a gloo group, a collective). ``submit``
    returns at once; ``wait`` blocks until the write in flight is on disk and committed; ``check``
    raises the failure of a finished write without blocking. A failure is never dropped: it is
    raised by the next ``check``, ``wait`` or ``submit``.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self.buffers = HostBuffers() if torch.cuda.is_available() else None
        # A group of its own: the writer thread's collective must not interleave with the step's.
        multi = dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30)) if multi else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self.last_bytes = 0
        self.last_seconds = 0.0

    def submit(self, what: str, files: list[tuple[Path, object]], commit: Callable[[], None] | None) -> None:
        """Write ``files`` ((path, snapshot) pairs; a str is written as text) durably, fsync their
        directories, agree with every rank that all wrote, then run ``commit`` (rank 0's rename and
        ``latest``) where it is given. ``what`` names the checkpoint in errors."""
        self.wait()
        self._what = what
        if not self.background:
            self._run(files, commit)
            self.check()
            return
        self._thread = threading.Thread(target=self._run, args=(files, commit), name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self, files, commit) -> None:
        t0, written, ok, current = time.perf_counter(), 0, True, None
        try:
            for path, obj in files:
                current = path
                written += write_durable(Path(path), obj)
            current = None
            for d in {Path(p).parent for p, _ in files}:
                fsync_dir(d)
        except BaseException as e:  # noqa: BLE001 -- reported to the training thread, never dropped
            ok, self._error = False, _described(e, self._what, current)
        finally:
            if self.buffers is not None:
                self.buffers.give_back([t for _, obj in files for t in host_tensors(obj)])
        try:
            if self._group is not None:  # every rank wrote its part (or one failed: nobody commits)
                flag = torch.tensor([int(ok)], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
                if ok and not flag.item():
                    ok, self._error = False, UserError(f"checkpoint {self._what}: another rank failed to write "
                                                       "its part (its own error says why); not committed")
            if ok and commit is not None:
                commit()
        except BaseException as e:  # noqa: BLE001 -- as above
            self._error = self._error or _described(e, self._what, None)
        self.last_bytes, self.last_seconds = written, time.perf_counter() - t0

    def check(self) -> None:
        """Raise the failure of a finished background write, if there was one (does not block)."""
        if self._error is not None and (self._thread is None or not self._thread.is_alive()):
            error, self._error = self._error, None
            raise error

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight is durable and committed; raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


def _described(e: BaseException, what: str, path: Path | None) -> UserError:
    where = f" writing {path}" if path is not None else ""
    return UserError(f"checkpoint {what}: background write failed{where}: {type(e).__name__}: {e} "
                     "(the run stops here; `latest` still names the previous complete checkpoint)")

