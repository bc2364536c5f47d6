"""The frozen perceptual network (LPIPS) behind the image LPIPS and Gram losses, loaded offline.

Two trunk layouts exist, and a weight file only makes sense in the one it was trained in:

- ``vanilla``: torchvision's AlexNet / VGG16 features, cut into lpips' 5 slices (taps after relu1..5
  for AlexNet, relu1_2 .. relu5_3 for VGG16). torchvision's ImageNet weights + lpips' v0.1 linear
  layers give the LPIPS of ``lpips.LPIPS``.
- ``shift_tolerant``: ST-LPIPS (Ghildyal & Liu, ECCV 2022; the ``stlpips-pytorch`` package): the
  same convolutions, but AlexNet's conv1 has stride 1 and every downsampling is a stride-1 max-pool
  followed by a 3x3 binomial blur-pool of stride 2 (reflect padding 2). Its trunk runs at twice the
  spatial resolution of the vanilla one, and its file bundles its own linear layers (calibrated for
  that trunk; they differ from lpips'). It is the only trunk that ships with a package, so it is
  the offline default.

The layout is read from the file's keys (see ``_split_state``), never chosen by hand.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resample import reflect_pad

logger = logging.getLogger(__name__)

CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# torchvision's hub cache file names (the files lpips itself would download).
HUB_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# lpips' slice ends in torchvision's feature stack (relu1..5 / relu1_2..relu5_3 taps).
VANILLA_ENDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}


class BlurPool(nn.Module):
    """ST-LPIPS' ``Downsample(filt_size=3, stride=2, pad_more=True)``: reflect-pad 2, depthwise
    [1, 2, 1]^T [1, 2, 1] / 16 blur, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = a[:, None] * a[None, :]
        # Named ``filt`` like ST-LPIPS so its files load strictly; the values are fixed.
        self.register_buffer("filt", (filt / filt.sum()).expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reflect_pad: F.pad's reflection, or in deterministic mode on CUDA a form with a deterministic backward
        return F.conv2d(reflect_pad(x, 2), self.filt, stride=2, groups=x.shape[1])


def _conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=pad)


def _alex_layers(shift_tolerant: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    relu = lambda: nn.ReLU(inplace=True)  # noqa: E731 - a one-line local helper
    if not shift_tolerant:  # torchvision alexnet().features[:12]
        layers = [_conv(3, 64, 11, 4, 2), relu(), nn.MaxPool2d(3, 2), _conv(64, 192, 5, 1, 2), relu(),
                  nn.MaxPool2d(3, 2), _conv(192, 384, 3), relu(), _conv(384, 256, 3), relu(),
                  _conv(256, 256, 3), relu()]
        return layers, VANILLA_ENDS["alex"]
    layers = [_conv(3, 64, 11, 1, 2), BlurPool(64), relu(), nn.MaxPool2d(3, 1), BlurPool(64),
              _conv(64, 192, 5, 1, 2), relu(), nn.MaxPool2d(3, 1), BlurPool(192), _conv(192, 384, 3), relu(),
              _conv(384, 256, 3), relu(), _conv(256, 256, 3), relu()]
    return layers, (3, 7, 11, 13, 15)


def _vgg_layers(shift_tolerant: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    layers, ends, cin = [], [], 3
    for v in _VGG16:
        if v == "M":  # a slice ends before each pool
            ends.append(len(layers))
            layers += [nn.MaxPool2d(2, 1), BlurPool(cin)] if shift_tolerant else [nn.MaxPool2d(2, 2)]
        else:
            layers += [_conv(cin, v, 3), nn.ReLU(inplace=True)]
            cin = v
    return layers, (*ends, len(layers))


class Trunk(nn.Module):
    """5 slices ``slice1..slice5`` whose layers keep their index in the full feature stack, so the
    state-dict keys equal lpips' ``net.*`` keys (vanilla: torchvision's ``features.<i>`` index)."""

    def __init__(self, net: str, shift_tolerant: bool):
        super().__init__()
        layers, self.ends = (_alex_layers if net == "alex" else _vgg_layers)(shift_tolerant)
        start = 0
        for k, end in enumerate(self.ends):
            s = nn.Sequential()
            for i in range(start, end):
                s.add_module(str(i), layers[i])
            self.add_module(f"slice{k + 1}", s)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for k in range(len(self.ends)):
            x = getattr(self, f"slice{k + 1}")(x)
            out.append(x)
        return out


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # lpips.normalize_tensor: unit L2 norm over channels at every position.
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance with a frozen trunk. Inputs [B, 3, H, W] in [-1, 1]; gradients reach them."""

    def __init__(self, net: str = "alex", shift_tolerant: bool = True):
        super().__init__()
        if net not in CHANNELS:
            raise ValueError(f"perceptual net must be one of {sorted(CHANNELS)}, got {net!r}")
        self.net_name, self.shift_tolerant = net, shift_tolerant
        # lpips' ScalingLayer constants (ImageNet mean/std mapped to [-1, 1] inputs).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = Trunk(net, shift_tolerant)
        # lpips' NetLinLayer without its dropout (it only ever ran at lpips training time).
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[net])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # NOTE: always eval: a parent's .train() must not change the metric.
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> 5 trunk maps [B, C_k, H_k, W_k] (relu taps, not normalised)."""
        return self.net((x - self.shift) / self.scale)

    def distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS from precomputed features -> [B]: per layer, squared difference of channel-unit
        features, weighted over channels by the lin layer, averaged over space; summed over layers."""
        d = 0.0
        for lin, a, b in zip(self.lins, fx, fy, strict=True):
            d = d + lin((_unit_channels(a) - _unit_channels(b)) ** 2).mean((1, 2, 3))
        return d

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x), self.features(y))


# ---------------------------------------------------------------------------- weight files

def _package_dir(name: str) -> str | None:
    # find_spec locates the package without importing it (stlpips_pytorch imports IPython).
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def stlpips_file(net: str) -> str | None:
    d = _package_dir("stlpips_pytorch")
    return os.path.join(d, "weights", "vST0.0", f"{net}_shift_tolerant.pth") if d else None


def lpips_lin_file(net: str) -> str | None:
    d = _package_dir("lpips")
    return os.path.join(d, "weights", "v0.1", f"{net}.pth") if d else None


def hub_file(net: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", HUB_FILES[net])


def _first_existing(kind: str, candidates: list[tuple[str, str | None]]) -> tuple[str, str]:
    """candidates: (label, path) in priority order -> (label, path) of the first file that exists."""
    for label, path in candidates:
        if path and os.path.isfile(path):
            return label, path
    tried = "\n".join(f"  {label}: {path}" for label, path in candidates)
    raise FileNotFoundError(f"no {kind} weights found; tried:\n{tried}")


_LIN_KEY = re.compile(r"^lins?\.?(\d+)\.(?:model\.1\.)?weight$")  # lpips 'lin3.model.1.weight', ours 'lins.3.weight'


def _split_state(sd: dict, net: str) -> tuple[dict, dict, bool]:
    """A trunk file's state dict -> (trunk state in Trunk's keys, lin state in ours, shift_tolerant).

    Accepted layouts: torchvision (``features.<i>.*``, classifier ignored) -> vanilla; lpips /
    ST-LPIPS / ours (``[net.]slice<k>.<i>.*`` plus optional ``lin*`` keys) -> shift-tolerant iff it
    has blur-pool ``.filt`` buffers.
    """
    if any(k.startswith("features.") for k in sd):
        ends = VANILLA_ENDS[net]
        slice_of = {i: k + 1 for k, end in enumerate(ends) for i in range(ends[k - 1] if k else 0, end)}
        trunk = {}
        for key, v in sd.items():
            m = re.match(r"^features\.(\d+)\.(.+)$", key)
            if m and int(m[1]) in slice_of:
                trunk[f"slice{slice_of[int(m[1])]}.{m[1]}.{m[2]}"] = v
        return trunk, {}, False
    trunk = {k.removeprefix("net."): v for k, v in sd.items() if k.removeprefix("net.").startswith("slice")}
    if not trunk:
        raise ValueError(f"unrecognised trunk weight keys (first: {list(sd)[:4]})")
    return trunk, _lin_state(sd), any(k.endswith(".filt") for k in trunk)


def _lin_state(sd: dict) -> dict:
    """lpips-style linear-layer keys -> ``LPIPS.lins`` keys ('<k>.weight'); other keys ignored."""
    return {f"{m[1]}.weight": v for k, v in sd.items() if (m := _LIN_KEY.match(k))}


def _load(path: str) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def load_perceptual(net: str = "alex", trunk_weights: str | None = None, lin_weights: str | None = None) -> LPIPS:
    """Build the frozen LPIPS net from local files; nothing is downloaded.

    Trunk: ``trunk_weights`` > torchvision's hub cache file (vanilla trunk, as lpips uses) > the
    ST-LPIPS file shipped in ``stlpips-pytorch`` (shift-tolerant trunk). Linear layers:
    ``lin_weights`` > those bundled in the trunk file (ST-LPIPS) > lpips' ``weights/v0.1/<net>.pth``.
    """
    if net not in CHANNELS:
        raise ValueError(f"perceptual net must be one of {sorted(CHANNELS)}, got {net!r}")
    if trunk_weights is not None:
        candidates = [("explicit trunk_weights", trunk_weights)]
    else:
        candidates = [("torch hub cache", hub_file(net)), ("stlpips-pytorch", stlpips_file(net))]
    trunk_src, trunk_path = _first_existing(f"{net} trunk", candidates)
    trunk_sd, lin_sd, shift_tolerant = _split_state(_load(trunk_path), net)

    if lin_weights is not None:
        lin_src, lin_path = _first_existing(f"{net} LPIPS linear", [("explicit lin_weights", lin_weights)])
        lin_sd = _lin_state(_load(lin_path))
    elif lin_sd:
        lin_src, lin_path = "bundled with the trunk", trunk_path
    else:
        lin_src, lin_path = _first_existing(f"{net} LPIPS linear", [("lpips package", lpips_lin_file(net))])
        lin_sd = _lin_state(_load(lin_path))

    model = LPIPS(net, shift_tolerant)
    model.net.load_state_dict(trunk_sd, strict=True)
    model.lins.load_state_dict(lin_sd, strict=True)
    logger.info("perceptual net %s (%s trunk): trunk from %s (%s); linear layers from %s (%s)", net,
                "shift-tolerant" if shift_tolerant else "vanilla", trunk_path, trunk_src, lin_path, lin_src)
    return model
