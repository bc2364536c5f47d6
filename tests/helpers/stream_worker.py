"""Two-rank checks of the data streams, run by tests/integration/test_streams.py under torchrun (gloo):

    torchrun --nproc_per_node 2 tests/helpers/stream_worker.py SPEC.json OUT.json

SPEC holds a ``DataConfig`` (as a dict), the steps to run and where to cache shards. One launch runs
every check (the imports cost more than the checks); rank 0 writes what each rank saw:

- ``epoch``: per stream, the names of the first epoch each rank read (the test checks the ranks'
  sets are disjoint and cover the dataset);
- ``straight`` / ``resumed``: per step, per micro-batch, (stream, names, feature checksum) of a
  ``MixedLoader`` run for ``steps`` steps, and of a fresh one (new datasets, cold cache) resumed
  from the state gathered after ``resume_at`` steps, which must continue identically;
- ``state``: that gathered state (every rank's position in every stream).
"""
from __future__ import annotations

import copy
import gc
import json
import sys

import torch.distributed as dist

from atoken.data_pipeline import DataConfig, MixedLoader, StreamLoader
from atoken.model.config import from_dict
from atoken.training import distributed


def with_cache(data: DataConfig, root: str) -> DataConfig:
    """The same streams cached under ``root`` (shared by the ranks of this node, as in production)."""
    data = copy.deepcopy(data)
    for name, s in data.streams.items():
        s.local = f"{root}/{name}"
    return data


def first_epoch(data: DataConfig, rank: int, world: int) -> dict[str, list[str]]:
    out = {}
    for name, stream in data.streams.items():
        loader = StreamLoader(stream, data, rank, world)
        n = len(loader.epoch_ids(0))
        names = []
        while len(names) < n:
            names += next(loader).batch.names
        out[name] = names[:n]
        loader.close()
    return out


def record(loader: MixedLoader, steps: int) -> list[list[list]]:
    """Per step, per micro-batch: [stream, names, sum of features]."""
    out = []
    for _ in range(steps):
        step = []
        for _ in range(loader.micro_batches_per_step):
            micro = next(loader)
            step.append([micro.stream.name, micro.batch.names, float(micro.batch.features.double().sum())])
        out.append(step)
    return out


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    info = distributed.init()
    rank, world = info.rank, info.world_size
    data = from_dict(DataConfig, spec["data"])
    results = {"epoch": first_epoch(with_cache(data, f"{spec['cache']}/epoch"), rank, world)}

    straight = MixedLoader(with_cache(data, f"{spec['cache']}/straight"), rank=rank, world=world)
    first = record(straight, spec["resume_at"])
    state = straight.state_dict()  # collective
    rest = record(straight, spec["steps"] - spec["resume_at"])
    straight.close()
    del straight
    gc.collect()

    resumed = MixedLoader(with_cache(data, f"{spec['cache']}/resumed"), rank=rank, world=world)
    resumed.load_state_dict(state)
    again = record(resumed, spec["steps"] - spec["resume_at"])
    results.update(straight=first + rest, resumed=first + again, state=state)
    resumed.close()

    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if info.is_main:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
