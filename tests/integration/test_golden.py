"""Golden numerics: 20 deterministic steps of the ``demo`` config (``tiny``) on the bundled photos.

Every logged value of every step must equal ``tests/golden/demo_20_steps.json``: bit for bit on the
machine that wrote it (the file records which), within its measured ``rtol`` elsewhere
(``tests/helpers/golden_demo.py`` says how it was derived). A refactor that is meant to change no numerics is
checked to change none. When a change is *meant* to change them (a new loss term, another init),
regenerate the file and say why in the commit:

    python tests/helpers/golden_demo.py write

Not run on GPUs: the file pins CPU kernels.
"""
from __future__ import annotations

import pytest

from tests.helpers.golden_demo import drift, load, machine, mismatches, run_demo, tolerance

pytestmark = pytest.mark.slow  # spawns training / subprocess runs (make test-fast leaves it out)


def test_demo_losses_match_golden_file(tmp_path):
    golden = load()
    rtol = tolerance(golden)
    got = run_demo(tmp_path)
    bad = mismatches(golden["steps"], got, rtol)
    how = ("bit for bit (this is the machine that wrote the file)" if not any(rtol) else
           f"within rtol {rtol[0]:.3g} (step 1) .. {rtol[-1]:.3g} (step {len(rtol)}): this machine {machine()} is "
           f"not the one that wrote the file {golden['machine']}")
    assert not bad, f"the demo's numerics changed, compared {how}:\n" + "\n".join(bad)


def test_tolerant_comparison_fails_on_a_small_numeric_change(tmp_path):
    """The tolerance is not so loose that it passes anything: a learning rate 1% higher moves the
    losses well past it within the 20 steps (at some step by more than 10x that step's rtol), on any machine."""
    golden = load()
    lr = 1e-3  # the demo's peak (training/stages.py)
    got = run_demo(tmp_path, sets=[f"optim.lr={lr * 1.01!r}"])
    assert got[-1]["lr"] != golden["steps"][-1]["lr"], "the change did not take"
    floats = [[{k: v for k, v in r.items() if k != "lr"} for r in rs] for rs in (golden["steps"], got)]
    assert mismatches(*floats, golden["rtol"]), "a 1% learning-rate change passed the tolerant comparison"
    # By how many times its tolerance each step moved, at the step where that is most.
    moved = max(d / tol for d, tol in zip(drift(*floats), golden["rtol"], strict=True))
    assert moved > 10, f"a 1% learning-rate change moved the losses by at most {moved:.3g}x their tolerance"
