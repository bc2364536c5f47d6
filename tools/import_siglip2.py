"""Initialise an AToken model from a local SigLIP2 (naflex) checkpoint, as an inference directory.

    atoken-import-siglip2 /models/siglip2-so400m-patch16-naflex --out init/so400m
    atoken-import-siglip2 HF_DIR --out DIR --latent-channels 48 --seed 1

The encoder and the MAP head take SigLIP2's vision weights (``model/siglip2.py`` has the mapping);
the latent projection, the decoder and the sigmoid scale / bias are freshly initialised from
``--seed``. The result is an atoken inference directory (config.json + model.safetensors, fp32,
``Tokenizer.from_pretrained`` loads it) holding stage 1's initial weights. RoPE stays on unless
``--no-rope`` (only to reproduce SigLIP2 exactly, e.g. to check an import).
"""
from __future__ import annotations

import argparse

from atoken.model.errors import cli


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-import-siglip2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="local SigLIP2 checkpoint directory (Siglip2VisionModel or Siglip2Model, safetensors)")
    p.add_argument("--out", required=True, help="inference directory to write")
    p.add_argument("--latent-channels", type=int, default=32, help="C of the new latent (32 in stage 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parts SigLIP2 does not provide")
    p.add_argument("--no-rope", action="store_true", help="encoder without RoPE (reproduces SigLIP2 exactly)")
    args = p.parse_args(argv)
    # After parsing: torch, transformers and the model (--help answers at once).
    from atoken.model.inference_dir import read_inference_config  # noqa: PLC0415 - this CLI's thin entry: after parsing
    from atoken.model.siglip2 import import_siglip2  # noqa: PLC0415 - likewise

    out = import_siglip2(args.src, args.out, args.latent_channels, args.seed, rope=not args.no_rope)
    meta = read_inference_config(out)[1]
    enc = meta["model"]["encoder"]
    print(f"wrote {out}: encoder {enc['depth']} x {enc['width']} and MAP head from {args.src} "
          f"({meta['source']['imported_tensors']} tensors), RoPE {'off' if args.no_rope else 'on'}")


if __name__ == "__main__":
    main()
