"""Convert a training checkpoint into an inference directory (config.json + model.safetensors).

    atoken-convert runs/demo --out runs/demo/inference            # latest checkpoint, EMA, fp32
    atoken-convert runs/demo/checkpoints/step_00000100 --out x --weights raw --dtype bf16

The source may be a run directory, its ``checkpoints`` directory (the ``latest`` pointer picks the
checkpoint) or one checkpoint directory, saved at any parallel layout (ZeRO 1/2/3, tensor- and
data-parallel shards are merged). The result loads with ``Tokenizer.from_pretrained``.
"""
from __future__ import annotations

import argparse

from atoken.model.errors import cli


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="run directory, checkpoints directory or checkpoint directory")
    p.add_argument("--out", required=True, help="inference directory to write")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw weights")
    p.add_argument("--dtype", default="fp32", help="stored weight dtype: fp32 (default) or bf16")
    args = p.parse_args(argv)
    # After parsing: torch, the model and the checkpoint code (--help answers at once).
    from atoken.model.inference_dir import read_inference_config  # noqa: PLC0415 - this CLI's thin entry: after parsing
    from atoken.training.inference_export import convert  # noqa: PLC0415 - likewise

    out = convert(args.src, args.out, args.weights, args.dtype)
    print(f"wrote the inference directory {out} from {read_inference_config(out)[1]['source']['checkpoint']}")


if __name__ == "__main__":
    main()
