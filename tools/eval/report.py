"""Writing reports: JSON-safe values (PSNR is infinite for an exact reconstruction: JSON holds null
there), means, and the versions of what ran."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np


def _finite(v: float) -> float | None:
    # JSON has no inf/nan (PSNR of an exact reconstruction is inf).
    return v if math.isfinite(v) else None


def mean_or_none(values: list[float]) -> float | None:
    return _finite(float(np.mean(values))) if values else None


def json_safe(obj: Any) -> Any:
    """The report with every non-finite float replaced by None (JSON has no inf/nan)."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def versions(extra: tuple[str, ...] = ()) -> dict:
    """Python's and these packages' versions, for reports."""
    out = {"python": platform.python_version()}
    for pkg in ("atoken", "torch", "numpy", "scipy", "pillow", "mosaicml-streaming", *extra):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def write_report(out: Path, report: dict) -> dict:
    """``out/report.json`` (the folder made if needed), non-finite floats as null; returns what was written."""
    report = json_safe(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
