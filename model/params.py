"""Optimizer groups, declared by the modules that own the parameters (never guessed from names).

Each parameter gets two facts:

- ``decay``: AdamW's weight decay applies (matrices of linear maps) or not (biases, norm gains,
  learned tokens and position tables, logit scale / bias);
- ``encoder_lr``: it belongs to the SigLIP2-initialised encoder, which learns at
  ``OptimConfig.encoder_lr_mult`` times the LR.

Decay is decided per module, for its own (direct) parameters:

- ``nn.Linear`` and every module that declares ``DECAY = ("weight",)`` / ``NO_DECAY = ("bias",)``
  (the tensor-parallel linears do, training/parallelize.py): the weight is decayed, the bias not;
- norms (``nn.LayerNorm``, ``nn.RMSNorm``): not decayed;
- any other module names each of its parameters in a class attribute ``DECAY`` or ``NO_DECAY``
  (e.g. ``Encoder.NO_DECAY = ("pos_embed",)``).

A parameter that no rule covers raises: a new parameter cannot silently land in a group.
``encoder_lr`` is declared by the root module (``AToken.ENCODER_LR``: the child modules whose
parameters learn at the encoder's LR).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

NORMS = (nn.LayerNorm, nn.RMSNorm)


@dataclass(frozen=True)
class ParamGroup:
    decay: bool
    encoder_lr: bool

    @property
    def name(self) -> str:
        return f"{'encoder' if self.encoder_lr else 'rest'}_{'decay' if self.decay else 'no_decay'}"


def _decays(module: nn.Module, name: str, where: str) -> bool:
    decay, no_decay = getattr(module, "DECAY", ()), getattr(module, "NO_DECAY", ())
    if name in decay or name in no_decay:
        return name in decay
    if isinstance(module, nn.Linear):
        return name == "weight"
    if isinstance(module, NORMS):
        return False
    raise TypeError(f"parameter {where!r}: {type(module).__name__} does not declare whether {name!r} is "
                    "weight-decayed: list it in the class's DECAY or NO_DECAY (model/params.py)")


def optim_groups(model: nn.Module) -> dict[str, ParamGroup]:
    """{parameter name: its group} for every parameter of ``model`` (trainable or not), in
    ``named_parameters`` order."""
    slow = set(getattr(model, "ENCODER_LR", ()))
    out = {}
    for mod_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            out[full] = ParamGroup(decay=_decays(module, name, full), encoder_lr=full.split(".")[0] in slow)
    return {n: out[n] for n, _ in model.named_parameters()}
