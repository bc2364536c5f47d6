"""Worker processes (DataLoader workers, the shard writers' pool) started without forking this process.

The trainer and the shard writers run threads: the stream packers, streaming's and MDSWriter's S3
transfers, the checkpoint writer, the watchdog. ``fork`` copies every lock one of them holds at that
moment, held, and a child that needs one waits forever. CI saw it: a forked DataLoader worker freed
the thread-local PyAV reformatter an earlier video read had left in the parent, and FFmpeg's
``pthread_cond_destroy`` waited on a futex for good. Workers therefore start from a forkserver: a
single-threaded process that imported the heavy modules once (``PRELOAD``), so a worker does not
import them again as one started by ``spawn`` would (seconds each, for torch alone).

Two things a forked worker had for free, ``worker_init`` (the DataLoader's ``worker_init_fn``, the
pool's ``initializer``) gives back:
  * the environment of the process that made the workers, as it was then (a forkserver's child has the
    server's, from whenever the server started): the S3 endpoint and credentials, and TMPDIR, where
    streaming keeps its file locks;
  * an end when that process dies. A worker's parent is the server, so torch's check (has my parent
    pid changed?) never fires; a worker of a killed trainer would live on, keep the server alive, and
    keep the resource tracker from unlinking the trainer's shared memory, which a restarted run on the
    same cache then finds ("Reused local directory"). Each worker exits once its maker's sentinel does.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import tempfile
import threading
from collections.abc import Callable

# Imported once by the forkserver; the modality decoders (PyAV, trimesh) load in a worker when its
# stream needs them.
PRELOAD = ["torch", "streaming", "atoken.data_pipeline.dataset"]


def worker_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return ctx


def worker_init() -> Callable[..., None]:
    """``init_worker`` bound to this process's environment now: a DataLoader's ``worker_init_fn``, a
    pool's ``initializer``."""
    return functools.partial(init_worker, dict(os.environ))


def init_worker(env: dict[str, str], *_worker_id: int) -> None:
    """In a worker as it starts: ``env`` as its environment, and exit when the process that started it
    dies (``*_worker_id``: a DataLoader passes the worker's)."""
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # gettempdir() caches its answer: read TMPDIR again
    maker = multiprocessing.parent_process()  # the process that started this one, not the server
    if maker is not None:
        threading.Thread(target=_exit_with, args=(maker.sentinel,), name="atoken-exit-with-maker", daemon=True).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
