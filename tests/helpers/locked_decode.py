"""An image decode function that takes a module-level lock, for the test that DataLoader workers do not
inherit a lock another thread of the trainer holds (tests/unit/test_data.py)."""
import threading

from atoken.data_pipeline import image_sample

LOCK = threading.Lock()


def decode(raw, rng, stream):
    with LOCK:
        return image_sample(raw, rng, stream)
