"""Multi-process checks of training/checkpoint/, run by tests/integration/test_checkpoint_dist.py:

    torchrun --nproc_per_node N tests/helpers/checkpoint_worker.py PHASE ROOT

Each phase is one launch (imports and engine set-up cost more than the checks) and writes
``ROOT/PHASE.json`` from rank 0. The runs train a tiny AToken (depth 1) through the real engine,
EMA and checkpoint code on FIXED synthetic packed batches: micro-batch ``i`` of step ``s`` is the
same wherever it runs (DP rank ``i``, or the ``i``-th accumulation step at DP=1), and so is its
posterior noise. The step is the trainer's own (``training.train.micro_step``) with its ``Objective``.

- ``save`` (2 ranks): DP=2 runs at ZeRO 1/2/3 and TP=2 runs at ZeRO 1/3, K steps + K steps, saving
  after each K; then a save killed halfway (rank 1 SIGKILLs itself once its files are written).
- ``one`` (1 rank): the DP=2 and TP=2 checkpoints resumed at DP=1/TP=1; TP=1 reference runs.
- ``resume`` (2 ranks): the ZeRO runs resumed at their own layout; TP=1 -> TP=2; the crashed run.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

START = time.time()

# DeepSpeed imports its Muon optimizer (and with it torch's inductor, ~9 s a process) only to check
# whether ours is one (``isinstance``); we pass torch's AdamW, so a stand-in class answers as well.
_muon = types.ModuleType("deepspeed.runtime.zero.muon.muon_optimizer")
_muon.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
sys.modules.setdefault(_muon.__name__, _muon)

import torch  # noqa: E402 - after the Muon stand-in (above)
import torch.distributed as dist  # noqa: E402 - after the Muon stand-in (above)

from atoken.model import AToken, PackedBatch, patchify, preset  # noqa: E402 - after the Muon stand-in (above)
from atoken.model.losses import LossConfig  # noqa: E402 - after the Muon stand-in (above)
from atoken.model.objective import Objective  # noqa: E402 - after the Muon stand-in (above)
from atoken.training import checkpoint, distributed  # noqa: E402 - after the Muon stand-in (above)
from atoken.training.checkpoint.writer import write_durable  # noqa: E402 - after the Muon stand-in (above)
from atoken.training.config import RunConfig  # noqa: E402 - after the Muon stand-in (above)
from atoken.training.ema import EMA  # noqa: E402 - after the Muon stand-in (above)
from atoken.training.parallelize import full_state_dict, init_parallel, parallelize  # noqa: E402 - after the Muon stand-in (above)
from atoken.training.train import micro_step  # noqa: E402 - after the Muon stand-in (above)

SEED = 7
K = 2  # steps before and after the save
STEPS = 2 * K
JITTER = 1e-4  # input noise from each DP rank's checkpointed generator: exposes a wrong RNG restore
# The trainer's objective as L1 + 1e-3 KL (LPIPS and Gram weighted 0: the perceptual net does not run).
LOSS = LossConfig(rec_weight=1.0, kl_weight=1e-3, lpips_weight=0.0, gram_weight=0.0, clip_weight=0.0,
                  perceptual_size=32)


def model_config():
    cfg = preset("tiny")
    cfg.encoder.depth = cfg.decoder.depth = 1
    return cfg


def run_config(zero: int, mix_rounds: int) -> RunConfig:
    cfg = RunConfig(model=model_config(), steps=STEPS, precision="fp32", mix_rounds=mix_rounds)
    cfg.parallel.zero_stage = zero
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay = 1e-3, 1, 0.9
    return cfg


def micro_batch(step: int, index: int) -> PackedBatch:
    """Three images of mixed sizes (4 + 6 + 2 tokens, rotating), fixed by (step, index)."""
    g = torch.Generator().manual_seed(1000 * step + index)
    sizes = [(32, 32), (48, 32), (16, 32)]
    sizes = sizes[step % 3:] + sizes[:step % 3]
    parts = [(*patchify(torch.rand(3, h, w, generator=g) * 2 - 1), "image", 1) for h, w in sizes]
    return PackedBatch.cat(parts, names=[f"{step}.{index}.{i}" for i in range(len(parts))])


def posterior_noise(step: int, index: int) -> torch.Generator:
    """Micro-batch (step, index)'s posterior noise, the same at every layout (the trainer draws it
    from each DP rank's own stream, which an elastic resume cannot match)."""
    return torch.Generator().manual_seed(10**6 + 1000 * step + index)


class Run:
    """A model, its DeepSpeed engine, EMA, objective and jitter generator at one layout."""

    def __init__(self, tp: int, zero: int, mix_rounds: int = 1):
        self.dims = init_parallel(tp=tp, seed=SEED)
        torch.manual_seed(SEED)
        self.model = AToken(model_config())
        self.cfg = run_config(zero, mix_rounds)
        self.engine = parallelize(self.model, self.dims, self.cfg, torch.device("cpu"))
        self.ema = EMA(self.model, 0.9)
        self.objective = Objective(LOSS)
        self.noise = torch.Generator().manual_seed(SEED + 1 + self.dims.dp_rank)
        self.micro_batches = self.cfg.micro_batches_per_step  # one stream, one micro-batch a round
        self.writer = checkpoint.Writer()  # the trainer's background writer (a collective: every rank)

    def steps(self, first: int, last: int, jitter: float) -> dict[int, float]:
        """Train steps first..last; per step the loss averaged over the step's micro-batches."""
        losses = {}
        for step in range(first, last + 1):
            total = torch.zeros(())
            for a in range(self.micro_batches):
                index = self.dims.dp_rank * self.micro_batches + a
                batch = micro_batch(step, index)
                noise = torch.randn(batch.features.shape, generator=self.noise)
                batch = dataclasses.replace(batch, features=batch.features + jitter * noise)
                terms = micro_step(self.engine, self.objective, batch, [{}] * batch.num_samples, ("rec",),
                                   posterior_noise(step, index), nullcontext())
                total += terms["total"].detach() / self.micro_batches
            self.ema.update(self.model, step)
            if self.dims.dp > 1:
                dist.all_reduce(total, group=self.dims.dp_group)
                total /= self.dims.dp
            losses[step] = total.item()
        return losses

    def save(self, ckpt_dir: Path, step: int) -> Path:
        client = {"step": step, "config": self.cfg.to_dict(), "rank": dist.get_rank()}
        path = checkpoint.save(self.engine, self.ema, self.dims, {"noise": self.noise}, client, ckpt_dir, step, 5,
                               self.writer)
        self.writer.wait()  # written in the background, committed before the checks read it
        return path

    def load(self, path: Path) -> dict:
        return checkpoint.load(self.engine, self.ema, self.dims, {"noise": self.noise}, path)

    def groups(self) -> list[list[float]]:
        return [[g["lr"], g["weight_decay"]] for g in self.engine.optimizer.param_groups]

    def weights(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.engine, self.dims)

    def ema_matches(self, path: Path) -> bool:
        """This rank's EMA is its slice of the checkpoint's consolidated EMA (checked on every rank)."""
        full, mine = checkpoint.consolidate(path, "ema"), self.ema.state_dict()
        ok = True
        for n, p in self.model.named_parameters():
            t = full[n]
            if getattr(p, "tensor_model_parallel", False):
                t = t.chunk(self.dims.tp, dim=p.partition_dim)[self.dims.tp_rank]
            if hasattr(p, "ds_tensor"):
                t = checkpoint.partition(t, self.dims.dp, self.dims.dp_rank)
            ok &= torch.equal(t, mine[n])
        return all_ranks(ok)

    def ema_forward_err(self, path: Path) -> float:
        """``EMA.applied_to`` (every rank; a collective under ZeRO-3) vs a plain model holding the
        checkpoint's consolidated EMA, on one micro-batch."""
        batch = micro_batch(0, 0)
        plain = AToken(model_config())
        plain.load_state_dict(checkpoint.consolidate(path, "ema"))
        with torch.no_grad(), self.ema.applied_to(self.model):
            got = self.engine(batch, sample=False).recon
        with torch.no_grad():
            want = plain(batch, sample=False).recon
        return (got - want).abs().max().item()

    def close(self) -> None:
        del self.engine, self.model
        gc.collect()


def all_ranks(flag: bool) -> bool:
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def straight(root: Path, name: str, tp: int, zero: int, mix_rounds: int, jitter: float) -> dict:
    """STEPS steps in one go, saving after K and after STEPS."""
    run = Run(tp, zero, mix_rounds)
    ckpt = root / name / "checkpoints"
    losses = run.steps(1, K, jitter)
    run.save(ckpt, K)
    groups = run.groups()
    losses.update(run.steps(K + 1, STEPS, jitter))
    run.save(ckpt, STEPS)
    run.close()
    return {"losses": losses, "groups_at_k": groups}


def resumed(root: Path, source: str, tp: int, zero: int, mix_rounds: int, jitter: float, save_as: str | None = None
            ) -> dict:
    """Load ``source``'s step-K checkpoint at this layout and train steps K+1..STEPS."""
    run = Run(tp, zero, mix_rounds)
    path = root / source / "checkpoints" / checkpoint.tag_for(K)
    state = run.load(path)
    out = {"step": state["step"], "groups": run.groups(), "ema_ok": run.ema_matches(path),
           "weights_err": max_diff(run.weights(), checkpoint.consolidate(path, "raw")),
           "ema_forward_err": run.ema_forward_err(path),
           "own_client_state": all_ranks(state["rank"] == dist.get_rank())}
    out["losses"] = run.steps(K + 1, STEPS, jitter)
    if save_as:
        run.save(root / save_as / "checkpoints", STEPS)
    run.close()
    return out


def crash(root: Path) -> None:
    """Save step 1, then die in the middle of saving step 2 (never returns)."""
    run = Run(1, 2)
    ckpt = root / "crash" / "checkpoints"
    run.steps(1, 1, JITTER)
    run.save(ckpt, 1)
    run.steps(2, 2, JITTER)

    def write_then_die(what, files, commit):
        for path, state in files:  # its part durable, then it dies before the ranks agree to commit
            write_durable(path, state)
        os.kill(os.getpid(), signal.SIGKILL)

    if dist.get_rank() == 1:  # rank 0 writes its part, then waits for rank 1, which never answers
        run.writer.submit = write_then_die
    run.save(ckpt, 2)


def after_crash(root: Path) -> dict:
    """The crashed run continues: ``auto`` picks step 1, and saving step 2 again clears the debris."""
    ckpt = root / "crash" / "checkpoints"
    path = checkpoint.resolve("auto", ckpt)
    run = Run(1, 2)
    state = run.load(path)
    run.steps(2, 2, JITTER)
    run.save(ckpt, 2)
    run.close()
    return {"resolved": path.name, "step": state["step"]}


class Timed(dict):
    """Records how long each case took (``_seconds``), for keeping the launches within CI time."""

    def __setitem__(self, key, value):
        now = time.perf_counter()
        self.setdefault("_seconds", {})[key] = round(now - self._last, 2)
        self._last = now
        super().__setitem__(key, value)


def main(phase: str, root: str) -> None:
    root = Path(root)
    info = distributed.init()
    res = Timed()
    res._last = time.perf_counter()
    res["_start"] = round(time.time() - START, 2)  # interpreter start -> process group up
    if phase == "save":
        for zero in (1, 2, 3):
            res[f"dp2_z{zero}"] = straight(root, f"dp2_z{zero}", 1, zero, 1, JITTER)
        for zero in (1, 3):
            res[f"tp2_z{zero}"] = straight(root, f"tp2_z{zero}", 2, zero, 1, 0.0)
    elif phase == "one":
        for zero in (1, 2, 3):  # elastic: DP=2 -> DP=1 with the same global batch
            res[f"dp2_z{zero}_to_dp1"] = resumed(root, f"dp2_z{zero}", 1, zero, 2, JITTER)
        res["dp2_z3_to_dp1_z1"] = resumed(root, "dp2_z3", 1, 1, 2, JITTER)  # and another ZeRO stage
        for zero in (1, 3):
            res[f"tp2_z{zero}_to_tp1"] = resumed(root, f"tp2_z{zero}", 1, zero, 1, 0.0)
            res[f"tp1_z{zero}"] = straight(root, f"tp1_z{zero}", 1, zero, 1, 0.0)
    elif phase == "resume":
        for zero in (1, 2, 3):
            res[f"dp2_z{zero}"] = resumed(root, f"dp2_z{zero}", 1, zero, 1, JITTER, save_as=f"dp2_z{zero}_resumed")
        for zero in (1, 3):
            res[f"tp1_z{zero}_to_tp2"] = resumed(root, f"tp1_z{zero}", 2, zero, 1, 0.0)
        res["crash"] = after_crash(root)
    else:
        raise ValueError(phase)
    if info.is_main:
        (root / f"{phase}.json").write_text(json.dumps(res, indent=1))
    if phase == "save":
        dist.barrier()
        crash(root)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
