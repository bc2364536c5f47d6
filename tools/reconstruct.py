"""Reconstruct image files through a tokenizer and print each one's PSNR.

    atoken-reconstruct runs/demo/inference photo.jpg more/*.png --out recon/

Each image is encoded to its latent and decoded back at its own size; the reconstruction is written
to ``--out`` as PNG under the input's name.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atoken.data_pipeline.images import decode_image
from atoken.model.metrics import psnr
from atoken.model.tokenizer import Tokenizer


def save_png(img: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> 8-bit PNG."""
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def reconstruct_files(tokenizer: Tokenizer, paths: list[Path], out: Path) -> dict[str, float]:
    """Reconstruct each file into ``out``; returns name -> PSNR (dB, against the decoded original)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in paths:
        try:
            img = (decode_image(path.read_bytes()) + 1) / 2
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: cannot read image ({e})") from e
        recon = tokenizer.reconstruct([img])[0]
        save_png(recon, out / (path.stem + ".png"))
        results[path.name] = psnr(img, recon)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="inference directory written by atoken-convert")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--out", type=Path, default=Path("reconstructions"), help="output folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args(argv)
    tok = Tokenizer.from_pretrained(args.model, device=args.device)
    for name, value in reconstruct_files(tok, args.images, args.out).items():
        print(f"{name}: PSNR {value:.2f} dB")
    print(f"reconstructions written to {args.out}/")


if __name__ == "__main__":
    main()
