"""Sharded, atomic checkpoints of everything resumable; ``--resume auto``; resume at another layout.

Split by job:

- ``layout.py``: where the parts live (tags, file names, ``latest``), how the state is split
  (``Layout``), and the one way to find a checkpoint (``find``, ``resolve``) and read its client
  state (``client_state``);
- ``rng.py``: per-rank RNG state;
- ``save_load.py``: ``save`` and ``load``;
- ``writer.py``: the snapshot, and the background ``Writer`` that writes it durably and commits it;
- ``export.py``: ``consolidate``, the whole model's weights at any layout;
- ``reshard.py``: resuming at another layout through DeepSpeed's universal checkpoints;
- ``deepspeed_internals.py``: every reach past DeepSpeed's public API (the version is pinned);
- ``weights.py``: the one way to read a model's weights from a path (``read_weights``: a run, a
  checkpoint or an inference directory -> state dict, ``ModelConfig``, where they came from).

Layout of ``<run_dir>/checkpoints`` (``TT`` a tensor-parallel rank, ``D`` a data-parallel rank)::

    latest                  one line: the newest complete tag (replaced atomically, written last)
    step_00000100/          one complete checkpoint; every rank writes its own part of it
        layout.json                             how the state is split: tp, dp, ZeRO stage, and per
                                                parameter its TP-local shape and TP split dim
        mp_rank_TT_model_states.pt              ZeRO 1/2: TP rank TT's weights + our client state
        zero_pp_rank_D_mp_rank_TT_model_states.pt  ZeRO-3: the same, weights partitioned over D
        [zero_pp_rank_D_]mp_rank_TT_optim_states.pt  optimizer shard of (D, TT) (DeepSpeed's files)
        ema_zero_pp_rank_D_mp_rank_TT.pt        EMA of (D, TT): ZeRO-3 its partitions, split like the
                                                weights; ZeRO 1/2 its share of TP rank TT's tensors by
                                                name (older saves: ema_mp_rank_TT.pt, all of them)
        rank_NNNNN.pt                           global rank NNNNN's RNG (torch, numpy, python, our
                                                generators) and its own copy of the client state
    .staging/step_00000200/ a save in progress; renamed into place only when every rank is done
    .universal/step_00000100/  DeepSpeed's universal form of that checkpoint, made by the first resume
                            at another layout (kept for the next one; pruned with the checkpoint)

``save`` blocks the step only while it snapshots the state; the files are written in a background
thread, each fsynced, then their directory, and only when every rank's part is durable does rank 0
rename the staging directory into place and move ``latest`` (docs/checkpoints.md). A crash mid-save
leaves only a ``.staging`` directory, which ``latest`` never names and the next save clears.
Resuming at the saved (tp, dp, ZeRO stage) loads DeepSpeed's shards as they are; at another layout
``load`` reshards (reshard.py). Nothing to configure: the saved layout is read from
the checkpoint.
"""
from .export import consolidate
from .layout import (
    LAYOUT,
    Layout,
    client_state,
    find,
    is_checkpoint,
    latest_tag,
    partition,
    rank_file,
    read_layout,
    resolve,
    tag_for,
)
from .reshard import to_universal
from .save_load import load, save
from .weights import CHECKPOINT, INFERENCE, WeightsSource, find_weights, read_weights

__all__ = ["CHECKPOINT", "INFERENCE", "LAYOUT", "Layout", "WeightsSource", "client_state", "consolidate", "find",
           "find_weights", "is_checkpoint", "latest_tag", "load", "partition", "rank_file", "read_layout",
           "read_weights", "resolve", "save", "tag_for", "to_universal"]
from .writer import Writer

__all__ = ["LAYOUT", "Layout", "Writer", "client_state", "consolidate", "find", "is_checkpoint", "latest_tag", "load",
           "partition", "rank_file", "read_layout", "resolve", "save", "tag_for", "to_universal"]
