"""Convert a training checkpoint into an inference directory (config.json + model.safetensors).

    atoken-convert runs/demo --out runs/demo/inference            # latest checkpoint, EMA, fp32
    atoken-convert runs/demo/checkpoints/step_00000100 --out x --weights raw --dtype bf16

The source may be a run directory, its ``checkpoints`` directory (the ``latest`` pointer picks the
checkpoint) or one checkpoint directory, saved at any parallel layout (ZeRO 1/2/3, tensor- and
data-parallel shards are merged). The result loads with ``Tokenizer.from_pretrained``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from atoken.model.errors import UserError, cli

if TYPE_CHECKING:  # annotations only
    pass

# NOTE: torch, the model and the checkpoint code are imported where used: --help stays fast.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> torch dtype name


def convert(src: str | Path, out: str | Path, weights: str = "ema", dtype: str = "fp32") -> Path:
    """A run / checkpoints / checkpoint directory -> an inference directory at ``out``, from any training
    layout (ZeRO 1/2/3, tensor- and data-parallel shards merged: ``checkpoint.read_weights``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    import torch  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    from atoken.model.inference_dir import save_inference_dir  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.training.checkpoint import CHECKPOINT, find_weights, read_weights  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.training.guards import check_finite_weights  # noqa: PLC0415 - likewise

    if find_weights(src).kind != CHECKPOINT:
        raise UserError(f"{src} is an inference directory already (atoken-convert reads a run directory, its "
                        "checkpoints/ directory or a checkpoints/step_* directory)")
    state, source = read_weights(src, weights)
    check_finite_weights(state, f"{source.path} ({weights} weights)")  # a diverged run's weights are refused, named
    run_cfg = source.meta["config"]
    save_inference_dir(out, state, run_cfg["model"], weights, dtype=getattr(torch, DTYPES[dtype]),
                       source={"checkpoint": str(source.path.resolve()), "step": source.meta["step"],
                               "stage": run_cfg["stage"]})
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
    from atoken.model.inference_dir import read_inference_config  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    out = convert(args.src, args.out, args.weights, args.dtype)
    print(f"wrote the inference directory {out} from {read_inference_config(out)[1]['source']['checkpoint']}")


if __name__ == "__main__":
    main()
