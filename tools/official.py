"""The released AToken checkpoint format (``apple/ml-atoken``), both ways.

    atoken-import-official atoken-soc.pt --config atoken-soc.yaml --out soc/      # -> inference dir
    atoken-import-official atoken-soc.pt --config atoken-soc.yaml \
        --gs-model 3d_decode_gs.pt --gs-config 3d_decode_gs.yaml --out soc3d/    # + the Gaussian decoder
    atoken-export-official runs/s3 --out release/      # -> release/model.pt + release/config.yaml
                                                       #    (+ 3d_decode_gs.pt and .yaml with a Gaussian decoder)

A release is a torch state dict (``.pt`` or ``.safetensors``) of its ``AutoencoderKL`` plus a YAML
whose ``model.model_cfg.arch_cfg`` is passed to ``AutoencoderKLConfig``. The weights map one to one
onto ``AToken`` (``_NAMES``; 563 tensors for So/C); the fused QKV's rows are [3, H, D] there and
[H, 3, D] here (per head, for tensor parallelism).

The release's Gaussian decoder (``SLatGaussianDecoderTrain``) is a second state dict and YAML; its
weights map onto ``AToken.gaussian_decoder`` (``_GS_NAMES``). Its class also holds the frozen
LPIPS-VGG network of its training loss (``lpips_loss.*``), which strict loading needs: import keeps
those tensors as they are (``GS_EXTRA_FILE``) and export writes them back.

The release keeps the sigmoid loss' logit scale and bias as constants (4.8438, -15.5625), not in
the file: import sets ours to them, export refuses a model whose training moved them. Nothing is
dropped, added or averaged: a missing, unexpected or misshapen tensor is refused by name. The
weights are the release's licence's (research only, non-commercial; MODEL-LICENSE in the release).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from atoken.model import AToken, ModelConfig, TransformerConfig
from atoken.model.config import GaussianDecoderConfig
from atoken.model.errors import UserError, cli
from atoken.model.gaussians import GaussianDecoder
from atoken.model.inference_dir import read_inference_config, save_inference_dir
from atoken.model.splatting import FILTER_2D
from atoken.model.understanding import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT
from atoken.training.checkpoint import INFERENCE, read_weights

# The release's class, kept in the YAML we write (its loader reads only arch_cfg).
CLASS_NAME = "models.pretrained.autoencoder_kl.AutoencoderKLTrain"
# The release's FSQ codebook sizes whose levels are one value repeated (ours: fsq_levels ** fsq_group_dims).
FSQ_CODEBOOKS = {64: (8, 2), 512: (8, 3), 4096: (4, 6), 262145: (8, 6), 390625: (5, 8)}
POS_TABLE_SIZE = 16  # the release's LearnedPositionEmbedder: 256 patches, 16 x 16

# (release name, ours) templates for every tensor; {s}: encoder|decoder, {i}: block, {p}: weight|bias,
# {n}: norm1|norm2, {q}: q|k. The fused QKV's rows are reordered too (``_qkv_rows``).
_NAMES = [
    ("encoder.input_layer.{p}", "encoder.patch_embed.{p}"),
    ("{s}.pos_embedder.position_embedding.weight", "{s}.pos_embed"),
    ("{s}.blocks.{i}.{n}.{p}", "{s}.transformer.blocks.{i}.{n}.{p}"),
    ("{s}.blocks.{i}.attn.to_qkv.{p}", "{s}.transformer.blocks.{i}.attn.qkv.{p}"),
    ("{s}.blocks.{i}.attn.to_out.{p}", "{s}.transformer.blocks.{i}.attn.proj.{p}"),
    ("{s}.blocks.{i}.attn.{q}_rms_norm.gamma", "{s}.transformer.blocks.{i}.attn.{q}_norm.weight"),
    ("{s}.blocks.{i}.mlp.mlp.0.{p}", "{s}.transformer.blocks.{i}.mlp.fc1.{p}"),
    ("{s}.blocks.{i}.mlp.mlp.2.{p}", "{s}.transformer.blocks.{i}.mlp.fc2.{p}"),
    ("encoder.post_layernorm.{p}", "encoder.norm.{p}"),
    ("encoder.head.probe", "understanding.head.probe"),
    ("encoder.head.attention.to_q.{p}", "understanding.head.q.{p}"),
    ("encoder.head.attention.to_kv.{p}", "understanding.head.kv.{p}"),
    ("encoder.head.attention.to_out.{p}", "understanding.head.out.{p}"),
    ("encoder.head.layernorm.{p}", "understanding.head.norm.{p}"),
    ("encoder.head.mlp.mlp.0.{p}", "understanding.head.mlp.fc1.{p}"),
    ("encoder.head.mlp.mlp.2.{p}", "understanding.head.mlp.fc2.{p}"),
    ("proj.weight", "latent.weight"),
    ("decoder.input_layer.weight", "decoder.up.weight"),
    ("decoder.out_norm.weight", "decoder.norm.weight"),
    ("decoder.out_layer.weight", "decoder.head.weight"),
]
_FIELDS = {"s": "encoder|decoder", "i": r"\d+", "p": "weight|bias", "n": "norm1|norm2", "q": "q|k"}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, ...
    return re.compile("".join(re.escape(x) if k % 2 == 0 else f"(?P<{x}>{_FIELDS[x]})" for k, x in enumerate(parts)))


_TO_OURS = [(_regex(official), ours) for official, ours in _NAMES]
_TO_RELEASE = [(_regex(ours), official) for official, ours in _NAMES]

# The Gaussian decoder: release name (its own state dict) -> ours (under ``gaussian_decoder.``).
_GS_NAMES = [
    ("input_layer.weight", "up.weight"),
    ("blocks.{i}.{n}.weight", "blocks.{i}.{n}.weight"),
    ("blocks.{i}.attn.to_qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.to_out.weight", "blocks.{i}.attn.proj.weight"),
    ("blocks.{i}.mlp.mlp.0.weight", "blocks.{i}.mlp.fc1.weight"),
    ("blocks.{i}.mlp.mlp.2.weight", "blocks.{i}.mlp.fc2.weight"),
    ("out_layer.{p}", "head.{p}"),
    ("offset_perturbation", "offset_perturbation"),
]
_GS_TO_OURS = [(_regex(official), "gaussian_decoder." + ours) for official, ours in _GS_NAMES]
_GS_TO_RELEASE = [(_regex("gaussian_decoder." + ours), official) for official, ours in _GS_NAMES]
GS_CLASS_NAME = "models.pretrained.decoder_gs.SLatGaussianDecoderTrain"
GS_EXTRA_PREFIX = "lpips_loss."  # the release class' training-loss network, not part of the decoder
# Where an inference directory keeps those tensors (torch.save: some of them share storage).
GS_EXTRA_FILE = "gs_lpips.pt"


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for rx, template in table:
        m = rx.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


LOGIT_CONSTANTS = {"understanding.logit_scale": LOGIT_SCALE_INIT, "understanding.logit_bias": LOGIT_BIAS_INIT}


class FormatError(UserError):
    """The input cannot be converted; the message names what and why."""


def _qkv_rows(t: torch.Tensor, heads: int, to_ours: bool) -> torch.Tensor:
    """Fused QKV rows [3, H, D] (release) <-> [H, 3, D] (ours), for a weight [3W, in] or bias [3W]."""
    rest = t.shape[1:]
    if to_ours:
        return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


# ------------------------------------------------------------------ config


def model_config(arch: dict) -> ModelConfig:
    """The release's ``arch_cfg`` -> our ModelConfig; what we cannot build is refused by name."""
    def need(key, ok, want):
        if key in arch and arch[key] not in ok:
            raise FormatError(f"arch_cfg.{key} = {arch[key]!r} is not supported (this converter builds {want})")

    need("patch_size", ([4, 16, 16], (4, 16, 16)), "4x16x16 patches")
    need("in_channels", (3072,), "3072 input values per token")
    need("out_channels", (3072,), "3072 output values per token")
    need("use_decoder", (True,), "a model with its pixel decoder")
    need("encoder_use_rms_norm", (False,), "the SigLIP2 encoder: LayerNorm")
    need("encoder_qk_rms_norm", (False,), "the SigLIP2 encoder: no QK-norm")
    need("encoder_use_bias", (True,), "the SigLIP2 encoder: biases")
    need("decoder_use_rms_norm", (True,), "an RMSNorm decoder")
    for side in ("encoder", "decoder"):
        need(f"{side}_attn_mode", ("full",), "full attention")
        need(f"{side}_pe_mode", ("joint",), "learned table + 4D RoPE ('joint')")
    try:
        def tower(side: str, norm: str) -> TransformerConfig:
            width = arch[f"{side}_model_channels"]
            return TransformerConfig(arch[f"{side}_num_blocks"], width, arch.get(f"{side}_num_heads") or width // 64,
                                     int(arch[f"{side}_mlp_channels"]), norm=norm,
                                     qk_norm=bool(arch[f"{side}_qk_rms_norm"]), bias=bool(arch[f"{side}_use_bias"]))

        cfg = dict(encoder=tower("encoder", "layernorm"), decoder=tower("decoder", "rmsnorm"),
                   latent_channels=arch["latent_channels"], pos_table_size=POS_TABLE_SIZE, understanding=True)
    except KeyError as e:
        raise FormatError(f"arch_cfg has no {e.args[0]!r}") from None
    if arch.get("use_quantizer"):
        need("quantizer_type", ("fsq",), "FSQ")
        need("quantizer_chunk_size", (1,), "one FSQ chunk")
        size = arch.get("quantizer_codebook_size", 65536)
        if size not in FSQ_CODEBOOKS:
            raise FormatError(f"arch_cfg.quantizer_codebook_size = {size} has mixed FSQ levels; supported: "
                              f"{sorted(FSQ_CODEBOOKS)}")
        levels, dims = FSQ_CODEBOOKS[size]
        groups = arch.get("quantizer_num_codebooks", 1)
        if arch.get("quantizer_feature_dim", 48) != cfg["latent_channels"] or groups * dims != cfg["latent_channels"]:
            raise FormatError(f"FSQ over {groups} codebooks of {dims} dims must cover the whole latent of "
                              f"{cfg['latent_channels']} channels (quantizer_feature_dim "
                              f"{arch.get('quantizer_feature_dim', 48)})")
        cfg.update(quantizer="fsq", fsq_levels=levels, fsq_group_dims=dims)
    return ModelConfig(**cfg)


def arch_config(cfg: ModelConfig) -> dict:
    """Our ModelConfig -> the release's ``arch_cfg``; what the release cannot hold is refused by name."""
    problems = []
    enc, dec = cfg.encoder, cfg.decoder
    if (enc.norm, enc.qk_norm, enc.bias) != ("layernorm", False, True):
        problems.append(f"the encoder must be LayerNorm, no QK-norm, with biases (is {enc.norm}, {enc.qk_norm}, "
                        f"{enc.bias})")
    if dec.norm != "rmsnorm":
        problems.append(f"the decoder must use RMSNorm (is {dec.norm})")
    if not cfg.encoder_rope:
        problems.append("the encoder must apply RoPE (encoder_rope=False)")
    if cfg.pos_table_size != POS_TABLE_SIZE or cfg.rope_theta != 10000.0:
        problems.append(f"pos_table_size {cfg.pos_table_size} and rope_theta {cfg.rope_theta} must be 16 and 10000")
    if enc.norm_eps != 1e-6 or dec.norm_eps != 1e-6:
        problems.append("norm eps must be 1e-6")
    if not cfg.understanding:
        problems.append("the release always holds the MAP head (encoder.head): this model has none "
                        "(model.understanding=false)")
    arch = {"patch_size": [4, 16, 16], "in_channels": 3072, "out_channels": 3072,
            "latent_channels": cfg.latent_channels}
    for side, tc in (("encoder", enc), ("decoder", dec)):
        arch.update({f"{side}_model_channels": tc.width, f"{side}_num_blocks": tc.depth, f"{side}_num_heads": tc.heads,
                     f"{side}_mlp_channels": tc.mlp_width, f"{side}_attn_mode": "full", f"{side}_pe_mode": "joint",
                     f"{side}_qk_rms_norm": tc.qk_norm, f"{side}_use_bias": tc.bias,
                     f"{side}_use_rms_norm": tc.norm == "rmsnorm"})
    arch["use_decoder"] = True
    if cfg.quantizer == "fsq":
        size = {v: k for k, v in FSQ_CODEBOOKS.items()}.get((cfg.fsq_levels, cfg.fsq_group_dims))
        if size is None:
            problems.append(f"FSQ with {cfg.fsq_levels} levels x {cfg.fsq_group_dims} dims "
                            "has no release codebook size")
        arch.update(use_quantizer=True, quantizer_type="fsq", quantizer_codebook_size=size,
                    quantizer_feature_dim=cfg.latent_channels,
                    quantizer_num_codebooks=cfg.latent_channels // cfg.fsq_group_dims, quantizer_chunk_size=1)
    if problems:
        raise FormatError("the release format cannot hold this model: " + "; ".join(problems))
    return arch


# ------------------------------------------------------------------ weights


def from_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A release state dict -> ours (same tensors, renamed; QKV rows reordered; logit constants added)."""
    out, unexpected = {}, []
    for name, t in state.items():
        ours = _rename(name, _TO_OURS)
        if ours is None:
            unexpected.append(name)
            continue
        if ".attn.qkv." in ours:
            tc = cfg.encoder if ours.startswith("encoder.") else cfg.decoder
            t = _qkv_rows(t, tc.heads, to_ours=True)
        out[ours] = t
    for name, value in LOGIT_CONSTANTS.items():
        out[name] = torch.tensor([value], dtype=torch.float32)
    _check_against(out, cfg, unexpected, "the release checkpoint", lambda n: _rename(n, _TO_RELEASE) or n)
    return out


def to_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the release's (the inverse of ``from_official``)."""
    _check_against(state, cfg, [], "this model", lambda n: n)
    for name, value in LOGIT_CONSTANTS.items():
        t = state[name]
        if not torch.equal(t, torch.tensor([value]).to(t.dtype)):
            raise FormatError(f"{name} is {t.flatten().tolist()}, but the release fixes it at {value}: "
                              "its format cannot hold a trained logit scale or bias")
    out = {}
    for name, t in state.items():
        if name in LOGIT_CONSTANTS:
            continue
        official = _rename(name, _TO_RELEASE)
        if ".attn.qkv." in name:
            tc = cfg.encoder if name.startswith("encoder.") else cfg.decoder
            t = _qkv_rows(t, tc.heads, to_ours=False)
        out[official] = t.contiguous()
    return out


def _check_against(state: dict[str, torch.Tensor], cfg: ModelConfig, unexpected: list[str], what: str,
                   label) -> None:
    """Refuse, by name (``label``: our name -> the one the user knows), anything that does not fit
    ``AToken(cfg)`` exactly."""
    with torch.device("meta"):
        want = {n: tuple(p.shape) for n, p in AToken(cfg).state_dict().items()}
    _refuse(state, want, unexpected, what, label)


def _refuse(state: dict[str, torch.Tensor], want: dict[str, tuple], unexpected: list[str], what: str, label) -> None:
    missing = sorted(label(n) for n in set(want) - set(state))
    unexpected = sorted(unexpected + [label(n) for n in state if n not in want])
    wrong = sorted(f"{label(n)} {tuple(state[n].shape)} (expected {want[n]})" for n in set(want) & set(state)
                   if tuple(state[n].shape) != want[n])
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} ({len(items)})"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise FormatError(f"{what} does not fit the model its config describes: " + "; ".join(parts))


# ------------------------------------------------------------------ the Gaussian decoder


def gs_model_config(gs: dict) -> GaussianDecoderConfig:
    """The release's ``3d_decode_gs.yaml`` ``model`` section -> our GaussianDecoderConfig."""
    rep = gs.get("representation_config") or {}
    fixed = {"attn_mode": ("swin",), "pe_mode": ("ape",), "qk_rms_norm": (False,)}
    for key, ok in fixed.items():
        if key in gs and gs[key] not in ok:
            raise FormatError(f"model.{key} = {gs[key]!r} is not supported (the release's decoder has {ok[0]!r})")
    fixed_rep = (("perturb_offset", True), ("scaling_activation", "softplus"), ("2d_filter_kernel_size", FILTER_2D))
    for key, want in fixed_rep:
        if rep.get(key, want) != want:
            raise FormatError(f"representation_config.{key} = {rep[key]!r} is not supported (only {want!r})")
    try:
        width = gs["model_channels"]
        heads = gs.get("num_heads") or width // gs.get("num_head_channels", 64)
        tc = TransformerConfig(gs["num_blocks"], width, heads, int(gs.get("mlp_channels", 3072)), norm="rmsnorm",
                               qk_norm=False, bias=False)
        return GaussianDecoderConfig(
            tc, in_channels=gs["latent_channels"], gaussians_per_voxel=rep["num_gaussians"],
            resolution=gs["resolution"], window=gs["window_size"], voxel_size=rep["voxel_size"],
            lr={k: float(v) for k, v in rep["lr"].items()}, scaling_bias=rep["scaling_bias"],
            opacity_bias=rep["opacity_bias"], filter_3d=rep["3d_filter_kernel_size"])
    except KeyError as e:
        raise FormatError(f"the Gaussian decoder config has no {e.args[0]!r}") from None
    except ValueError as e:
        raise FormatError(f"the Gaussian decoder config: {e}") from None


def gs_yaml_config(g: GaussianDecoderConfig) -> dict:
    """Our GaussianDecoderConfig -> the release's ``3d_decode_gs.yaml`` (inverse of ``gs_model_config``)."""
    tc = g.transformer
    if (tc.norm, tc.qk_norm, tc.bias, tc.norm_eps) != ("rmsnorm", False, False, 1e-6):
        raise FormatError("the release's Gaussian decoder is RMSNorm (eps 1e-6), no QK-norm, no biases")
    rep = {"lr": dict(g.lr), "perturb_offset": True, "voxel_size": g.voxel_size, "num_gaussians": g.gaussians_per_voxel,
           "2d_filter_kernel_size": FILTER_2D, "3d_filter_kernel_size": g.filter_3d, "scaling_bias": g.scaling_bias,
           "opacity_bias": g.opacity_bias, "scaling_activation": "softplus"}
    return {"model": {"class_name": GS_CLASS_NAME, "resolution": g.resolution, "model_channels": tc.width,
                      "latent_channels": g.in_channels, "num_blocks": tc.depth, "num_heads": tc.heads,
                      "mlp_channels": tc.mlp_width, "attn_mode": "swin", "window_size": g.window,
                      "representation_config": rep}}


def gs_from_official(state: dict[str, torch.Tensor], g: GaussianDecoderConfig
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A release Gaussian-decoder state dict -> (ours, under ``gaussian_decoder.``; the ``lpips_loss.*``
    tensors, as they are)."""
    out, extra, unexpected = {}, {}, []
    for name, t in state.items():
        if name.startswith(GS_EXTRA_PREFIX):
            extra[name] = t
            continue
        ours = _rename(name, _GS_TO_OURS)
        if ours is None:
            unexpected.append(name)
            continue
        out[ours] = _qkv_rows(t, g.transformer.heads, to_ours=True) if ".attn.qkv." in ours else t
    _check_gs(out, g, unexpected, "the release's Gaussian decoder", lambda n: _rename(n, _GS_TO_RELEASE) or n)
    return out, extra


def gs_to_official(state: dict[str, torch.Tensor], g: GaussianDecoderConfig) -> dict[str, torch.Tensor]:
    """Our ``gaussian_decoder.*`` tensors -> the release's names (inverse of ``gs_from_official``)."""
    _check_gs(state, g, [], "this model's Gaussian decoder", lambda n: n)
    return {_rename(n, _GS_TO_RELEASE): (_qkv_rows(t, g.transformer.heads, to_ours=False) if ".attn.qkv." in n
                                         else t).contiguous() for n, t in state.items()}


def _check_gs(state, g: GaussianDecoderConfig, unexpected: list[str], what: str, label) -> None:
    with torch.device("meta"):
        want = {"gaussian_decoder." + n: tuple(p.shape) for n, p in GaussianDecoder(g).state_dict().items()}
    _refuse(state, want, unexpected, what, label)


# ------------------------------------------------------------------ files


def _read_state(model: Path) -> dict[str, torch.Tensor]:
    if not model.is_file():
        raise FormatError(f"{model}: no such file")
    try:
        if model.suffix == ".safetensors":
            state = load_file(str(model))
        else:
            state = torch.load(model, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input, named
        raise FormatError(f"{model}: cannot read it as a state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{model}: not a flat state dict of tensors")
    return state


def _read_yaml(config: Path, keys: tuple[str, ...]) -> dict:
    if not config.is_file():
        raise FormatError(f"{config}: no such file")
    try:
        d = yaml.safe_load(config.read_text())
        for k in keys:
            d = d[k]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise FormatError(f"{config}: not a release config ({'.'.join(keys)} not found: {e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{config}: {'.'.join(keys)} is not a mapping")
    return d


def read_official(model: str | Path, config: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    arch = _read_yaml(Path(config), ("model", "model_cfg", "arch_cfg"))
    return _read_state(Path(model)), model_config(arch)


def read_official_gs(model: str | Path, config: str | Path) -> tuple[dict[str, torch.Tensor], GaussianDecoderConfig]:
    """``3d_decode_gs.pt`` and ``3d_decode_gs.yaml`` -> (its state dict, our config)."""
    gs = _read_yaml(Path(config), ("model",))
    try:
        g = gs_model_config(gs)
    except FormatError as e:
        raise FormatError(f"{config}: {e}") from None
    return _read_state(Path(model)), g


def import_official(model: str | Path, config: str | Path, out: str | Path, gs_model: str | Path | None = None,
                    gs_config: str | Path | None = None) -> Path:
    """Release files -> an inference directory (``Tokenizer.from_pretrained``), in the release's dtype;
    with ``gs_model`` and ``gs_config``, the Gaussian decoder too (both files' dtypes are recorded,
    the directory holds the wider one)."""
    if (gs_model is None) != (gs_config is None):
        raise FormatError("give the Gaussian decoder's weights and its YAML together (--gs-model and --gs-config)")
    state, cfg = read_official(model, config)
    ours = from_official(state, cfg)
    dtype = next(iter(state.values())).dtype
    source = {"release": str(Path(model).resolve()), "config": str(Path(config).resolve())}
    extra = {}
    if gs_model is not None:
        gs_state, g = read_official_gs(gs_model, gs_config)
        gs_ours, extra = gs_from_official(gs_state, g)
        ours.update(gs_ours)
        cfg = dataclasses.replace(cfg, gaussian=g)
        gs_dtype = next(iter(gs_ours.values())).dtype
        source.update(gs_release=str(Path(gs_model).resolve()), gs_config=str(Path(gs_config).resolve()),
                      release_dtype=str(dtype).removeprefix("torch."), gs_dtype=str(gs_dtype).removeprefix("torch."))
        dtype = torch.promote_types(dtype, gs_dtype)
    out = save_inference_dir(out, ours, cfg.to_dict(), weights="release", dtype=dtype, source=source)
    if extra:
        torch.save(extra, out / GS_EXTRA_FILE)
    return out


def export_official(src: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Ours -> ``OUT/model.pt`` + ``OUT/config.yaml``, loadable by the release's ``ATokenWrapper``; with a
    Gaussian decoder also ``OUT/3d_decode_gs.pt`` + ``.yaml``, loadable strictly by its
    ``SLatGaussianDecoderTrain`` (which needs the LPIPS tensors an import kept)."""
    state, source = read_weights(src, weights)
    cfg = source.cfg
    dtypes = source.meta.get("source", {}) if source.kind == INFERENCE else {}
    def cast(d: dict, key: str) -> dict:  # back to the dtype an import recorded
        return {k: v.to(getattr(torch, dtypes[key])) for k, v in d.items()} if key in dtypes else d
    gs = {k: state.pop(k) for k in [k for k in state if k.startswith("gaussian_decoder.")]}
    g, cfg = cfg.gaussian, dataclasses.replace(cfg, gaussian=None)
    arch = arch_config(cfg)
    official = to_official(state, cfg)
    gs_official = None
    if g is not None:
        extra_file = source.path / GS_EXTRA_FILE
        if not extra_file.is_file():
            raise FormatError(f"{extra_file} not found: the release's SLatGaussianDecoderTrain loads strictly, "
                              f"with the LPIPS-VGG tensors of its training loss ({GS_EXTRA_PREFIX}*), which only an "
                              "inference directory imported from 3d_decode_gs.pt holds")
        gs_official = {**cast(gs_to_official(gs, g), "gs_dtype"), **_read_state(extra_file)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(cast(official, "release_dtype"), out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump({"model": {"class_name": CLASS_NAME,
                                                               "model_cfg": {"arch_cfg": arch}}},
                                                     sort_keys=False))
    if gs_official is not None:
        torch.save(gs_official, out / "3d_decode_gs.pt")
        (out / "3d_decode_gs.yaml").write_text(yaml.safe_dump(gs_yaml_config(g), sort_keys=False))
    return out


@cli
def import_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-import-official", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the release's weights: MODEL.pt or MODEL.safetensors")
    p.add_argument("--config", required=True, help="the release's YAML beside it (e.g. atoken-soc.yaml)")
    p.add_argument("--gs-model", help="the release's Gaussian decoder weights (3d_decode_gs.pt), to add 3D decoding")
    p.add_argument("--gs-config", help="its YAML (3d_decode_gs.yaml)")
    p.add_argument("--out", required=True, help="inference directory to write")
    args = p.parse_args(argv)
    out = import_official(args.model, args.config, args.out, args.gs_model, args.gs_config)
    print(f"wrote the inference directory {out} ({read_inference_config(out)[1]['dtype']}) from {args.model}")


@cli
def export_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-export-official", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an inference directory, a run directory or a checkpoint directory")
    p.add_argument("--out", required=True, help="folder to write model.pt and config.yaml into")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="from a checkpoint: EMA (default) or raw")
    args = p.parse_args(argv)
    out = export_official(args.src, args.out, args.weights)
    gs = " and 3d_decode_gs.pt/.yaml" if (out / "3d_decode_gs.pt").is_file() else ""
    print(f"wrote {out}/model.pt and config.yaml{gs} (the release's format) from {args.src}")
