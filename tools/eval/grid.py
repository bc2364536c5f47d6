"""The grid of the k worst and k best reconstructions by PSNR, each original above its reconstruction."""
from __future__ import annotations

import heapq
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


class Extremes:
    """The k lowest- and k highest-PSNR (original, reconstruction) pairs, kept as thumbnails."""

    def __init__(self, k: int, cell: int):
        self.k, self.cell = k, cell
        self.worst: list = []  # max-heap of the k lowest via (-psnr, ...)
        self.best: list = []  # min-heap of the k highest
        self._n = 0

    def _thumb(self, img: torch.Tensor) -> Image.Image:
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(np.ascontiguousarray(arr))
        pil.thumbnail((self.cell, self.cell), Image.Resampling.BICUBIC)
        return pil

    def add(self, name: str, value: float, original: torch.Tensor, recon: torch.Tensor) -> None:
        if self.k <= 0:
            return
        self._n += 1  # tie-breaker: heap entries never compare their payloads
        thumbs = None
        for heap, key in ((self.worst, -value), (self.best, value)):
            if len(heap) < self.k or key > heap[0][0]:
                thumbs = thumbs or (self._thumb(original), self._thumb(recon))
                entry = (key, self._n, name, value, *thumbs)
                (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, entry)

    def save(self, path: Path, rows: str = "top: original, bottom: reconstruction") -> None:
        """Blocks 'worst' then 'best' (ascending PSNR); per block a row of originals above a row of
        reconstructions, each pair labelled with its name and PSNR."""
        cell, label, pad = self.cell, 28, 6
        blocks = [("worst PSNR", sorted(self.worst, key=lambda e: e[3])),
                  ("best PSNR", sorted(self.best, key=lambda e: e[3]))]
        cols = max(1, max(len(b) for _, b in blocks))
        titles = [f"{title} ({rows})" for title, _ in blocks]
        text_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t) for t in titles)
        width = max(pad + cols * (cell + pad), 2 * pad + math.ceil(text_w))
        block_h = 20 + 2 * cell + label + pad
        grid = Image.new("RGB", (width, len(blocks) * block_h + pad), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for bi, ((_, entries), title) in enumerate(zip(blocks, titles, strict=True)):
            top = pad + bi * block_h
            draw.text((pad, top + 2), title, fill=(0, 0, 0))
            for ci, (_, _, name, value, orig, rec) in enumerate(entries):
                x = pad + ci * (cell + pad)
                for ri, thumb in enumerate((orig, rec)):
                    y = top + 20 + ri * cell
                    grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
                short = name if len(name) <= 24 else "..." + name[-21:]
                draw.text((x, top + 20 + 2 * cell + 2), f"{short}\n{value:.2f} dB", fill=(0, 0, 0))
        grid.save(path)
