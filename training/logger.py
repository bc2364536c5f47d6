"""What a run reports: a progress bar, ``metrics.jsonl``, ``events.jsonl`` and wandb (offline by default).

Only rank 0 writes. The wandb run id is kept in the run directory so a resumed run appends to the
same wandb run.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm import tqdm

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """What ran where: the code's commit, library versions, the device, and the launch (Slurm job,
    its restart count, nodes, world size). Written with every start and resume to events.jsonl."""
    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = os.environ
    return {
        "commit": git_commit(), "host": socket.gethostname(), "python": sys.version.split()[0],
        **{pkg: version(pkg) for pkg in ("torch", "deepspeed", "megatron-core", "mosaicml-streaming",
                                         "flash-attn", "nvidia-dali-cuda120")},
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": int(env.get("WORLD_SIZE", 1)),
        "slurm_job": env.get("SLURM_JOB_ID"), "slurm_restart": int(env.get("SLURM_RESTART_COUNT", 0)),
        "slurm_nodes": env.get("SLURM_JOB_NODELIST"),
    }


class RunLogger:
    def __init__(self, cfg, run_dir: Path, start_step: int, enabled: bool):
        self.enabled, self.run_dir, self.total = enabled, run_dir, cfg.steps
        self.bar = self.wandb = None
        if not enabled:
            return
        if start_step:
            _drop_after(run_dir / "metrics.jsonl", start_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run: close() closes it
        self.event("resume" if start_step else "start", step=start_step, **environment())
        if cfg.log.wandb_mode != "disabled":
            import wandb  # noqa: PLC0415 - wandb takes seconds to import: the main rank only

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.name, id=run_id, resume="allow",
                                    dir=str(run_dir), mode=cfg.log.wandb_mode, config=cfg.to_dict())
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal
        self._t, self._tokens, self._waited = time.perf_counter(), 0, 0.0
        self._t0, self._step0 = self._t, start_step

    def event(self, kind: str, **fields) -> None:
        if self.enabled:
            with open(self.run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def step(self, step: int, tokens: int, metrics: dict | None, waited: float = 0.0) -> None:
        """Called after every optimizer step; ``metrics`` only on logging steps. ``waited``: seconds
        the step waited for data (logged as ``data_wait``, the fraction of wall time since the last log)."""
        if not self.enabled:
            return
        self.bar.update(1)
        self._tokens += tokens
        self._waited += waited
        if metrics is None:
            return
        dt = max(time.perf_counter() - self._t, 1e-9)
        metrics = {"step": step, **metrics, "tokens_per_s": self._tokens / dt, "data_wait": self._waited / dt}
        self._t, self._tokens, self._waited = time.perf_counter(), 0, 0.0
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if self.bar.disable:  # no terminal: the same facts as the bar, as a log line
            per_step = (time.perf_counter() - self._t0) / max(1, step - self._step0)
            eta = f"{(self.total - step) * per_step / 60:.1f} min"
            log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f eta %s", step, self.total, metrics["loss"],
                     metrics["lr"], metrics["tokens_per_s"], eta)
        if self.wandb:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def rewind(self, step: int) -> None:
        """Back to ``step`` (a rollback to its checkpoint): the records of later steps are dropped, so
        that each step appears once, as in a run that never went past it."""
        if not self.enabled:
            return
        self.metrics.close()
        _drop_after(self.run_dir / "metrics.jsonl", step)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - kept open for the run, as in __init__
        self.bar.reset(total=self.total)
        self.bar.update(step)

    def eval(self, step: int, psnrs: dict[str, float], originals: list, recons: list) -> None:
        if not self.enabled:
            return
        mean = sum(psnrs.values()) / len(psnrs)
        record = {"step": step, "eval_psnr": mean, "eval_psnr_per_image": psnrs}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        log.info("step %d: held-out PSNR %.2f dB (%s)", step, mean,
                 ", ".join(f"{k} {v:.2f}" for k, v in psnrs.items()))
        if self.wandb:
            import wandb  # noqa: PLC0415 - wandb takes seconds to import: the main rank only

            self.wandb.log({"eval/psnr": mean,
                            "eval/reconstructions": wandb.Image(grid_pixels(originals, recons),
                                                                caption="top: original, bottom: reconstruction")},
                           step=step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.metrics.close()
            if self.wandb:
                self.wandb.finish()


def _drop_after(path: Path, step: int) -> None:
    """Remove the records of steps after ``step`` (logged before a crash, then lost with it): a
    resumed run logs them again, so each step appears once, as in an uninterrupted run."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def grid_pixels(originals: list[torch.Tensor], recons: list[torch.Tensor], side: int = 128) -> np.ndarray:
    """Images [3, H, W] in [0, 1] -> uint8 [H', W', 3]: originals on the top row, reconstructions
    below, each resized to side x side.

    NOTE: 8-bit, because wandb.Image casts a float array to uint8 without scaling (a [0, 1] grid
    came out black)."""
    resize = torchvision.transforms.functional.resize
    tiles = [resize(x.float().cpu(), [side, side], antialias=True) for x in originals + recons]
    grid = torchvision.utils.make_grid(tiles, nrow=len(originals), padding=2)  # [3, 2s + 6, n*(s + 2) + 2]
    return np.ascontiguousarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
