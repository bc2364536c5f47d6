"""The checkpoint writer's own contract, in one process: the snapshot is a copy, a failed background
write is raised (never dropped) and commits nothing, and a write commits only after its files."""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from atoken.model.errors import UserError
from atoken.training.checkpoint.writer import Writer, atomic_write, snapshot


def test_snapshot_is_a_copy_that_keeps_structure_and_sharing():
    w = torch.arange(6.0)
    state = {"module": OrderedDict(w=w, tied=w), "steps": [torch.tensor(3)], "rng": (np.arange(3), 7), "name": "x"}
    copy = snapshot(state)
    w.add_(100)  # the training step goes on mutating the live tensors in place
    state["rng"][0][0] = 99
    assert torch.equal(copy["module"]["w"], torch.arange(6.0))
    assert copy["module"]["tied"] is copy["module"]["w"]  # one tensor met twice: copied (and saved) once
    assert type(copy["module"]) is OrderedDict and copy["name"] == "x" and copy["rng"][1] == 7
    assert copy["rng"][0][0] == 0


def test_background_write_commits_after_its_files(tmp_path):
    seen = []
    writer = Writer()
    files = [(tmp_path / "a.pt", {"x": torch.ones(3)}), (tmp_path / "layout.json", "{}")]
    writer.submit("step_1", files, lambda: seen.append(sorted(p.name for p in tmp_path.iterdir())))
    writer.wait()
    assert seen == [["a.pt", "layout.json"]]
    assert torch.equal(torch.load(tmp_path / "a.pt")["x"], torch.ones(3))
    assert writer.last_bytes > 0


def test_failed_background_write_is_raised_and_commits_nothing(tmp_path):
    committed = []
    writer = Writer()
    missing = tmp_path / "gone" / "b.pt"  # its folder does not exist: the write fails in the thread
    writer.submit("step_2", [(tmp_path / "a.pt", torch.ones(1)), (missing, torch.ones(1))],
                  lambda: committed.append(1))
    while writer.in_flight():
        time.sleep(0.01)
    with pytest.raises(UserError, match=r"checkpoint step_2: background write failed writing .*gone/b\.pt"):
        writer.check()
    assert committed == []
    writer.check()  # raised once, then cleared
    # A failure also stops the next save (``submit`` waits first), so it cannot go unnoticed.
    writer.submit("step_3", [(missing, torch.ones(1))], None)
    with pytest.raises(UserError, match="step_3"):
        writer.submit("step_4", [], None)


def test_atomic_write_replaces_whole(tmp_path):
    atomic_write(tmp_path / "latest", "step_00000001\n")
    atomic_write(tmp_path / "latest", "step_00000002\n")
    assert (tmp_path / "latest").read_text() == "step_00000002\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
