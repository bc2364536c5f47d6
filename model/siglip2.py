"""Import a HF SigLIP2 (naflex) vision checkpoint into our Encoder and MAP head.

The source is a LOCAL ``save_pretrained`` directory of ``Siglip2VisionModel`` or ``Siglip2Model``
(config.json + model.safetensors, or a sharded safetensors index). Weights are read with
safetensors; the config with ``transformers`` (which fills the defaults that ``save_pretrained``
leaves out of config.json). Name mapping (HF ``vision_model.`` prefix dropped):

    embeddings.patch_embedding [W, 768]   -> encoder.patch_embed [W, 3072]: frame t = 0's columns
    embeddings.position_embedding [s*s, W] -> encoder.pos_embed (both row-major over (row, column))
    encoder.layers.i.layer_norm1/2        -> encoder.transformer.blocks.i.norm1/2
    encoder.layers.i.self_attn.q/k/v_proj -> ...blocks.i.attn.qkv (fused per head, ``fuse_qkv``)
    encoder.layers.i.self_attn.out_proj   -> ...blocks.i.attn.proj
    encoder.layers.i.mlp.fc1/fc2          -> ...blocks.i.mlp.fc1/fc2
    post_layernorm                        -> encoder.norm
    head.probe / attention.in_proj / attention.out_proj / layernorm / mlp
                                          -> understanding.head.probe / q + kv / out / norm / mlp

NOTE: the patch embedding's columns for frames t = 1..3 are set to ZERO. An image's frames 1..3
are zero padding, so image outputs are exactly SigLIP2's whatever those columns hold; zeros make a
video token start as the embedding of its first frame (so a video tile reads like its first image)
and let training grow the temporal part, while copying the 2D filter into every frame would make a
still video's tokens 4x an image's. Gradients reach the zero columns from the first step.

SigLIP2 has no RoPE: a model reproduces it only with ``ModelConfig(encoder_rope=False)`` (or
``model.encoder.transformer.rope = False``); training keeps RoPE on.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .autoencoder import AToken, Encoder
from .config import CHANNELS, PATCH_HW, ModelConfig, TransformerConfig
from .hf_checkpoint import read_safetensors
from .inference_dir import save_inference_dir
from .packed import PackedBatch
from .transformer import fuse_qkv
from .understanding import MAPHead

PREFIX = "vision_model."
FRAME_DIM = CHANNELS * PATCH_HW * PATCH_HW  # 768 values of one frame of a token


def vision_config(path: str | Path):
    """The checkpoint's ``Siglip2VisionConfig`` (from a vision-only or a full SigLIP2 directory)."""
    from transformers import AutoConfig  # noqa: PLC0415 - transformers takes seconds to import: SigLIP2 paths only
    from transformers.utils import CONFIG_NAME  # noqa: PLC0415 - likewise; Hugging Face's config.json (not ours)

    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path}/{CONFIG_NAME} not found: pass a local SigLIP2 checkpoint directory")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type == "siglip2":
        cfg = cfg.vision_config
    if cfg.model_type != "siglip2_vision_model":
        raise ValueError(f"{path}: model_type {cfg.model_type!r} is not a SigLIP2 (naflex) model")
    return cfg


def encoder_config(hf_cfg) -> tuple[TransformerConfig, int]:
    """(our encoder's TransformerConfig, position table side) for a ``Siglip2VisionConfig``."""
    if hf_cfg.patch_size != PATCH_HW or hf_cfg.num_channels != CHANNELS:
        raise ValueError(f"SigLIP2 patch {hf_cfg.patch_size} px x {hf_cfg.num_channels} channels; atoken's "
                         f"patches are {PATCH_HW} px x {CHANNELS} channels")
    if hf_cfg.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP2 activation {hf_cfg.hidden_act!r}; atoken's MLP is GELU(tanh)")
    side = round(hf_cfg.num_patches ** 0.5)
    if side * side != hf_cfg.num_patches:
        raise ValueError(f"SigLIP2 num_patches {hf_cfg.num_patches} is not a square position table")
    tc = TransformerConfig(hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.num_attention_heads,
                           hf_cfg.intermediate_size, norm="layernorm", qk_norm=False, bias=True,
                           norm_eps=hf_cfg.layer_norm_eps)
    return tc, side


def model_config(path: str | Path, latent_channels: int = 32, rope: bool = True) -> ModelConfig:
    """An AToken config whose encoder is the checkpoint's shape, the decoder of the same widths
    (RMSNorm, QK-norm, no biases, as the presets), the understanding head on."""
    tc, side = encoder_config(vision_config(path))
    dec = TransformerConfig(tc.depth, tc.width, tc.heads, tc.mlp_width, norm="rmsnorm", qk_norm=True, bias=False)
    return ModelConfig(encoder=tc, decoder=dec, latent_channels=latent_channels, pos_table_size=side,
                       encoder_rope=rope, understanding=True)


def convert_state_dict(hf: dict[str, torch.Tensor], heads: int, depth: int) -> dict[str, torch.Tensor]:
    """HF vision tensors (``vision_model.*``) -> our names (``encoder.*``, ``understanding.head.*``).

    Raises on a missing tensor, and on any HF vision tensor left unused (nothing is dropped silently).
    """
    src = {k[len(PREFIX):]: v for k, v in hf.items() if k.startswith(PREFIX)}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise KeyError(f"SigLIP2 checkpoint lacks {PREFIX}{name}")
        used.add(name)
        return src[name]

    out = {}
    w = take("embeddings.patch_embedding.weight")  # [W, 768] over (h, w, c)
    patch = w.new_zeros(w.shape[0], 4 * FRAME_DIM)
    patch[:, :FRAME_DIM] = w  # frame t = 0; frames 1..3 zero (module docstring)
    out["encoder.patch_embed.weight"] = patch
    out["encoder.patch_embed.bias"] = take("embeddings.patch_embedding.bias")
    out["encoder.pos_embed"] = take("embeddings.position_embedding.weight")
    for i in range(depth):
        a, b = f"encoder.layers.{i}.", f"encoder.transformer.blocks.{i}."
        for hf_norm, ours in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
            for p in ("weight", "bias"):
                out[f"{b}{ours}.{p}"] = take(f"{a}{hf_norm}.{p}")
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = fuse_qkv(*(take(f"{a}self_attn.{x}_proj.{p}") for x in "qkv"), heads)
            out[f"{b}attn.proj.{p}"] = take(f"{a}self_attn.out_proj.{p}")
            out[f"{b}mlp.fc1.{p}"] = take(f"{a}mlp.fc1.{p}")
            out[f"{b}mlp.fc2.{p}"] = take(f"{a}mlp.fc2.{p}")
    for p in ("weight", "bias"):
        out[f"encoder.norm.{p}"] = take(f"post_layernorm.{p}")
    if any(k.startswith("head.") for k in src):
        h = "understanding.head."
        out[h + "probe"] = take("head.probe").reshape(-1)  # [1, 1, W] -> [W]
        width = out[h + "probe"].shape[0]
        in_w, in_b = take("head.attention.in_proj_weight"), take("head.attention.in_proj_bias")  # [3W, W], [3W]
        out[h + "q.weight"], out[h + "kv.weight"] = in_w[:width], in_w[width:]
        out[h + "q.bias"], out[h + "kv.bias"] = in_b[:width], in_b[width:]
        for p in ("weight", "bias"):
            out[f"{h}out.{p}"] = take(f"head.attention.out_proj.{p}")
            out[f"{h}norm.{p}"] = take(f"head.layernorm.{p}")
            out[f"{h}mlp.fc1.{p}"] = take(f"head.mlp.fc1.{p}")
            out[f"{h}mlp.fc2.{p}"] = take(f"head.mlp.fc2.{p}")
    unused = sorted(set(src) - used)
    if unused:
        raise KeyError(f"{len(unused)} SigLIP2 vision tensors have no place in atoken: {unused[:5]}")
    return out


@torch.no_grad()
def load_siglip2(model: AToken, path: str | Path) -> list[str]:
    """Copy a SigLIP2 checkpoint's vision weights into ``model`` (a plain, non-parallel AToken, whose
    encoder must have the checkpoint's shape). Returns the names of the parameters written; the
    latent, the decoder and the sigmoid scale / bias keep their values. The checkpoint's MAP head
    is required when the model has ``understanding`` and refused when it has not."""
    tc, side = encoder_config(vision_config(path))
    enc = model.cfg.encoder
    if (enc.depth, enc.width, enc.heads, enc.mlp_width, model.cfg.pos_table_size) != \
            (tc.depth, tc.width, tc.heads, tc.mlp_width, side):
        raise ValueError(f"{path}: SigLIP2 encoder (depth {tc.depth}, width {tc.width}, heads {tc.heads}, mlp "
                         f"{tc.mlp_width}, table {side}x{side}) does not fit the model's (depth {enc.depth}, width "
                         f"{enc.width}, heads {enc.heads}, mlp {enc.mlp_width}, table {model.cfg.pos_table_size})")
    state = convert_state_dict(read_safetensors(path, PREFIX), tc.heads, tc.depth)
    has_head = any(k.startswith("understanding.") for k in state)
    if model.understanding is not None and not has_head:
        raise ValueError(f"{path}: the checkpoint has no MAP head (vision_use_head=False) but the model has an "
                         "understanding head to initialise")
    if model.understanding is None and has_head:
        raise ValueError(f"{path}: the checkpoint's MAP head has no place: build the model with "
                         "ModelConfig(understanding=True)")
    params = dict(model.named_parameters())
    for name, t in state.items():
        if name not in params:
            raise KeyError(f"{name} is not a parameter of the model (is it tensor-parallel? load before parallelizing)")
        if params[name].shape != t.shape:
            raise ValueError(f"{name}: SigLIP2 gives {tuple(t.shape)}, the model has {tuple(params[name].shape)}")
        params[name].copy_(t)
    return sorted(state)


class Siglip2ImageTower(nn.Module):
    """Frozen SigLIP2 image embeddings (the distillation teacher) on our packed batches: our Encoder
    with RoPE off plus the MAP head, holding the checkpoint's weights (so it is SigLIP2, tested)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.encoder_rope:
            raise ValueError("Siglip2ImageTower reproduces SigLIP2, which has no RoPE: use encoder_rope=False")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = MAPHead(cfg.encoder)
        self.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Siglip2ImageTower:
        tower = cls(model_config(path, rope=False))
        tc = tower.cfg.encoder
        state = convert_state_dict(read_safetensors(path, PREFIX), tc.heads, tc.depth)
        if not any(k.startswith("understanding.head.") for k in state):
            raise ValueError(f"{path}: the checkpoint has no MAP head (vision_use_head=False); no image embedding")
        state = {k.replace("understanding.head.", "head.", 1): v for k, v in state.items()}
        tower.load_state_dict(state, strict=True)
        return tower

    @torch.no_grad()
    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embedding [B, width] L2-normalised, pooled [B, width]), one per sample of ``batch``."""
        return self.head(self.features(batch), batch.cu_seqlens)

    def features(self, batch: PackedBatch) -> torch.Tensor:
        """The encoder's tokens [N, width] (after the final LayerNorm). Differentiable in the input
        (the CLIP/feature term's gradient reaches the decoder through it); the weights stay frozen."""
        return self.encoder(batch.features, batch.attention_layout(), None)

    def train(self, mode: bool = True) -> Siglip2ImageTower:
        return super().train(False)  # frozen: stays in eval mode


def import_siglip2(src: str | Path, out: str | Path, latent_channels: int = 32, seed: int = 0,
                   rope: bool = True) -> Path:
    """An inference directory at ``out``: AToken with SigLIP2's vision weights from ``src`` (atoken-import-siglip2)."""
    cfg = model_config(src, latent_channels=latent_channels, rope=rope)
    torch.manual_seed(seed)
    model = AToken(cfg)
    written = load_siglip2(model, src)
    save_inference_dir(out, model.state_dict(), cfg.to_dict(), "siglip2-import",
                       source={"siglip2": str(Path(src).resolve()), "imported_tensors": len(written), "seed": seed})
    return Path(out)
