"""Worker processes (DataLoader workers, the shard writers' pool) started without forking this process.

The trainer and the shard writers run threads: the stream packers, streaming's and MDSWriter's S3
transfers, the checkpoint writer, the watchdog. ``fork`` copies every lock one of them holds at that
moment, held, and a child that needs one waits forever. CI saw it: a forked DataLoader worker freed
the thread-local PyAV reformatter an earlier video read had left in the parent, and FFmpeg's
``pthread_cond_destroy`` waited on a futex for good. Workers therefore start from a forkserver: a
single-threaded process that imported the heavy modules once (``PRELOAD``), so a worker does not
import them again as one started by ``spawn`` would (6 s on the 2-core CPU machine).

A forkserver's child has the server's environment, from whenever the server started (the first
workers of this process). ``adopt_environment`` (the DataLoader's ``worker_init_fn``, the pool's
``initializer``) gives it the parent's as it was when the workers were made: the S3 endpoint and
credentials, and TMPDIR, where streaming keeps its file locks.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import tempfile
from collections.abc import Callable

# Imported once by the forkserver; the modality decoders (PyAV, trimesh) load in a worker when its
# stream needs them.
PRELOAD = ["torch", "streaming", "atoken.data_pipeline.dataset"]


def worker_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return ctx


def adopt_environment(env: dict[str, str], *_worker_id: int) -> None:
    """Make ``env`` this process's environment (``*_worker_id``: a DataLoader passes the worker's)."""
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # gettempdir() caches its answer: read TMPDIR again


def with_this_environment() -> Callable[..., None]:
    """``adopt_environment`` bound to this process's environment now."""
    return functools.partial(adopt_environment, dict(os.environ))
