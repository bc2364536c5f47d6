"""Test-only fault injection: the faults the guards exist for, made to happen in a real run.

Off unless ``ATOKEN_TEST_FAULTS`` holds a JSON list of faults (tests/test_guards.py, tests/test_cluster.py):

- ``{"kind": "nan", "sample": NAME, "step": S}``: that sample's decoded pixels become NaN (its loss is
  not finite), whenever it comes, or only in step S; without "sample", the micro-batch's first;
- ``{"kind": "scale", "step": S, "factor": F}``: step S's pixels times F (a finite loss spike);
- ``{"kind": "hang", "rank": R, "step": S}``: rank R stops making progress in step S;
- ``{"kind": "slow", "rank": R, "seconds": T, "until": S}``: rank R sleeps T s before each micro-batch
  (of steps up to S).

``nan`` fires whenever its sample comes; ``scale`` and ``hang`` once per run directory (a marker file
under ``run_dir/faults/``), so a rolled-back or requeued run goes on as a real one would.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "ATOKEN_TEST_FAULTS"


class Faults:
    def __init__(self, run_dir: Path, rank: int):
        self.faults = json.loads(os.environ.get(ENV) or "[]")
        self.markers, self.rank = Path(run_dir) / "faults", rank
        if self.faults:
            log.warning("test faults injected (%s): %s", ENV, self.faults)

    def _once(self, fault: dict) -> bool:
        """True the first time ``fault`` fires in this run directory."""
        marker = self.markers / "_".join(f"{k}{v}" for k, v in sorted({**fault, "on": self.rank}.items()))
        if marker.exists():
            return False
        self.markers.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def inject(self, step: int, micro) -> None:
        """Before a micro-batch's forward (features float [N, 3072] on the device)."""
        names = micro.batch.names
        for f in self.faults:
            kind = f["kind"]
            if kind == "nan" and f.get("sample", names[0]) in names and f.get("step", step) == step:
                i = names.index(f.get("sample", names[0]))
                cu = micro.batch.cu_seqlens
                micro.batch.features[int(cu[i]):int(cu[i + 1])] = float("nan")
            elif kind == "scale" and step == f["step"] and self._once({**f, "slot": micro.stream.name}):
                micro.batch.features.mul_(f["factor"])
            elif kind == "slow" and self.rank == f["rank"] and step <= f.get("until", step):
                time.sleep(f["seconds"])
            elif kind == "hang" and self.rank == f["rank"] and step == f["step"] and self._once(f):
                log.warning("test fault: rank %d hangs in step %d", self.rank, step)
                while True:
                    time.sleep(3600)
