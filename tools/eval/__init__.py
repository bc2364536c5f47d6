"""Evaluation of a trained tokenizer, behind the thin CLIs ``atoken-evaluate`` (tools/evaluate.py) and
``atoken-zero-shot`` (tools/zero_shot.py).

- ``inputs``: the input listing and readers (folders, files, MDS shards -> ``Item``s);
- ``metrics``: PSNR, SSIM, LPIPS pairs, FID; ``inception`` (rFID) and ``i3d`` (rFVD) networks;
- ``ranking``: zero-shot ranks, accuracy and recall;
- ``reconstruction``: images and videos, and ``evaluate`` (the whole report); ``assets``: 3D;
- ``understanding``: zero-shot classification and retrieval;
- ``grid`` and ``report``: the worst/best grid and the JSON report.
"""
