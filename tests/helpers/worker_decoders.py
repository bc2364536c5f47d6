"""Image decode functions for the tests of DataLoader worker processes (tests/unit/test_data.py):
workers start from a forkserver, not by forking the trainer (data_pipeline/workers.py)."""
import os
import threading

from atoken.data_pipeline import image_sample

LOCK = threading.Lock()
MARK = "ATOKEN_TEST_MARK"


def locked(raw, rng, stream):
    """Takes ``LOCK``: a worker forked while another thread held it would wait forever."""
    with LOCK:
        return image_sample(raw, rng, stream)


def named_by_environment(raw, rng, stream):
    """The sample named by the worker's ``$ATOKEN_TEST_MARK``: which environment the worker has."""
    return {**image_sample(raw, rng, stream), "name": os.environ.get(MARK, "")}
