"""Every parameter's optimizer group, as the model declares it (model/params.py), listed in full for
every preset: a renamed or added parameter fails here instead of silently changing group."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from atoken.model import AToken, preset
from atoken.model.gaussians import gaussian_decoder_preset
from atoken.model.params import optim_groups
from atoken.training.config import OptimConfig
from atoken.training.engine import param_groups

D, N = "decay", "no_decay"
# One transformer block's parameters: the encoder's (LayerNorm, biases) and the decoders' (RMSNorm,
# QK-RMSNorm, no biases; the Gaussian decoder's blocks are the same).
ENCODER_BLOCK = {"norm1.weight": N, "norm1.bias": N, "attn.qkv.weight": D, "attn.qkv.bias": N, "attn.proj.weight": D,
                 "attn.proj.bias": N, "norm2.weight": N, "norm2.bias": N, "mlp.fc1.weight": D, "mlp.fc1.bias": N,
                 "mlp.fc2.weight": D, "mlp.fc2.bias": N}
DECODER_BLOCK = {"norm1.weight": N, "attn.qkv.weight": D, "attn.proj.weight": D, "attn.q_norm.weight": N,
                 "attn.k_norm.weight": N, "norm2.weight": N, "mlp.fc1.weight": D, "mlp.fc2.weight": D}
# The Gaussian decoder's blocks: no QK-norm (the release's).
GAUSSIAN_BLOCK = {k: g for k, g in DECODER_BLOCK.items() if "_norm" not in k}
ENCODER = {"encoder.pos_embed": N, "encoder.patch_embed.weight": D, "encoder.patch_embed.bias": N,
           "encoder.norm.weight": N, "encoder.norm.bias": N}
REST = {"latent.weight": D, "decoder.up.weight": D, "decoder.pos_embed": N, "decoder.norm.weight": N,
        "decoder.head.weight": D,
        "understanding.logit_scale": N, "understanding.logit_bias": N, "understanding.head.probe": N,
        **{f"understanding.head.{m}.{p}": D if p == "weight" else N
           for m in ("q", "kv", "out", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")},
        "understanding.head.norm.weight": N, "understanding.head.norm.bias": N,
        "gaussian_decoder.up.weight": D, "gaussian_decoder.head.weight": D, "gaussian_decoder.head.bias": N}


def expected(cfg) -> dict[str, str]:
    out = {name: f"encoder_{g}" for name, g in ENCODER.items()}
    out.update({f"encoder.transformer.blocks.{i}.{k}": f"encoder_{g}"
                for i in range(cfg.encoder.depth) for k, g in ENCODER_BLOCK.items()})
    out.update({name: f"rest_{g}" for name, g in REST.items()})
    out.update({f"decoder.transformer.blocks.{i}.{k}": f"rest_{g}"
                for i in range(cfg.decoder.depth) for k, g in DECODER_BLOCK.items()})
    out.update({f"gaussian_decoder.blocks.{i}.{k}": f"rest_{g}"
                for i in range(cfg.gaussian.transformer.depth) for k, g in GAUSSIAN_BLOCK.items()})
    return out


@pytest.mark.parametrize("name", ["tiny", "base", "so400m"])
def test_every_parameter_of_every_preset_has_its_declared_group(name):
    """All heads on (MAP head, Gaussian decoder), built on the meta device (no memory, no init time)."""
    cfg = dataclasses.replace(preset(name), understanding=True, gaussian=gaussian_decoder_preset("base"))
    with torch.device("meta"):
        model = AToken(cfg)
    got = {n: g.name for n, g in model.optim_groups().items()}
    want = expected(cfg)
    assert got == want, {"missing": sorted(set(want) - set(got))[:10], "unexpected": sorted(set(got) - set(want))[:10],
                         "moved": {n: (want[n], got[n]) for n in set(got) & set(want) if got[n] != want[n]}}
    assert got["encoder.pos_embed"] == "encoder_no_decay" and got["decoder.pos_embed"] == "rest_no_decay"


def test_engine_groups_follow_the_declaration():
    """The trainer's AdamW groups: LR and weight decay per declared group; the position table undecayed."""
    cfg = dataclasses.replace(preset("tiny"), understanding=True)
    with torch.device("meta"):
        model = AToken(cfg)
    model.decoder.head.weight.requires_grad_(False)  # frozen parameters are left out
    o = OptimConfig(lr=1.0, weight_decay=0.5, encoder_lr_mult=0.1)
    groups = param_groups(model, o)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {
        "encoder_decay": (0.1, 0.5), "encoder_no_decay": (0.1, 0.0), "rest_decay": (1.0, 0.5),
        "rest_no_decay": (1.0, 0.0)}
    assert by_name["encoder.pos_embed"]["weight_decay"] == 0.0
    assert by_name["understanding.logit_scale"]["weight_decay"] == 0.0
    assert "decoder.head.weight" not in by_name and len(by_name) == sum(p.requires_grad for p in model.parameters())


def test_an_undeclared_parameter_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

    class Declared(Scale):
        NO_DECAY = ("gain",)

    with pytest.raises(TypeError, match=r"'body.gain': Scale does not declare"):
        optim_groups(_seq(body=Scale()))
    assert optim_groups(_seq(body=Declared()))["body.gain"].name == "rest_no_decay"


def _seq(**children) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m
