"""Convert a training checkpoint into an inference directory (config.json + model.safetensors).

    atoken-convert runs/demo --out runs/demo/inference            # latest checkpoint, EMA, fp32
    atoken-convert runs/demo/checkpoints/step_00000100 --out x --weights raw --dtype bf16

The source may be a run directory, its ``checkpoints`` directory (the ``latest`` pointer picks the
checkpoint) or one checkpoint directory, saved at any parallel layout (ZeRO 1/2/3, tensor- and
data-parallel shards are merged). The result loads with ``Tokenizer.from_pretrained``.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from atoken.model.errors import UserError, cli

# NOTE: torch, the model and the checkpoint code are imported where used: --help stays fast.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> torch dtype name


def find_checkpoint(path: str | Path) -> Path:
    """A run dir / checkpoints dir / checkpoint dir -> one complete checkpoint directory
    (``checkpoint.find``), or the CLI's error."""
    from atoken.training import checkpoint

    ckpt = checkpoint.find(path)
    if ckpt is None:
        raise UserError(f"{path} is not a checkpoint (no {checkpoint.LAYOUT} or *model_states.pt); pass a "
                        "run directory, its checkpoints/ directory or a checkpoints/step_* directory")
    return ckpt


def load_weights(ckpt: Path, which: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, client state) of one checkpoint; ``which`` is "ema" or "raw".

    Works at any training layout (ZeRO 1/2/3, any tensor- and data-parallel size): the shards are
    merged into the plain single-process model's state dict (``checkpoint.consolidate``).
    """
    from atoken.training import checkpoint

    files = sorted(ckpt.glob("*model_states.pt"))
    damaged = "it is incomplete or damaged (an interrupted copy?): convert another checkpoints/step_* directory"
    if not files:
        raise UserError(f"{ckpt}: no *model_states.pt file; {damaged}")
    try:  # a truncated file fails in torch.load (RuntimeError, EOFError, UnpicklingError), a missing one as OSError
        client = {k: v for k, v in checkpoint.client_state(ckpt).items() if k in ("step", "config")}
        return checkpoint.consolidate(ckpt, which), client
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{ckpt}: cannot read it ({type(e).__name__}: {first}); {damaged}") from None


def convert(src: str | Path, out: str | Path, weights: str = "ema", dtype: str = "fp32") -> Path:
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    import torch

    from atoken.model.tokenizer import save_inference_dir
    from atoken.training.guards import check_finite_weights

    ckpt = find_checkpoint(src)
    state, client = load_weights(ckpt, weights)
    check_finite_weights(state, f"{ckpt} ({weights} weights)")  # a diverged run's weights are refused, named
    if "config" not in client or "step" not in client:
        raise UserError(f"{ckpt}: its model states hold no run config (not written by atoken-train?)")
    run_cfg = client["config"]
    save_inference_dir(out, state, run_cfg["model"], weights, dtype=getattr(torch, DTYPES[dtype]),
                       source={"checkpoint": str(ckpt.resolve()), "step": client["step"], "stage": run_cfg["stage"]})
    return Path(out)


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="run directory, checkpoints directory or checkpoint directory")
    p.add_argument("--out", required=True, help="inference directory to write")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw weights")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="stored weight dtype")
    args = p.parse_args(argv)
    out = convert(args.src, args.out, args.weights, args.dtype)
    print(f"wrote {out}/config.json and model.safetensors from {find_checkpoint(args.src)}")


if __name__ == "__main__":
    main()
