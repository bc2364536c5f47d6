"""The one reader of weights from a path (training/checkpoint/weights.py), the one loader of config
dataclasses (model/config.py's ``from_dict``) and the one check of a parallel layout (``check_layout``).

Reading a real checkpoint at every layout is covered where one is trained: test_checkpoint_dist.py
(TP=2 / ZeRO-3 through ``atoken-convert``), test_training.py and test_official.py (the hand-off)."""
import dataclasses
import json

import pytest
import torch

from atoken.data_pipeline.config import TASKS
from atoken.model import AToken, from_dict, preset
from atoken.model.errors import UserError
from atoken.model.inference_dir import save_inference_dir
from atoken.model.losses import LossConfig
from atoken.model.objective import Objective, weigh
from atoken.training.checkpoint import INFERENCE, find_weights, read_weights
from atoken.training.config import RunConfig, check_layout, load_yaml
from atoken.training.inference_export import convert
from atoken.training.stages import stage3


def micro_config():
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 1, 64, 2, 128
    return dataclasses.replace(cfg, latent_channels=8)


def test_an_inference_directory_reads_as_stored_with_its_config_and_origin(tmp_path):
    cfg = micro_config()
    torch.manual_seed(0)
    state = AToken(cfg).state_dict()
    save_inference_dir(tmp_path / "inf", state, cfg.to_dict(), "ema", {"checkpoint": "x", "step": 7},
                       dtype=torch.bfloat16)
    got, source = read_weights(tmp_path / "inf", "raw")  # "raw" does not apply to an inference directory
    assert source.kind == INFERENCE and source.path == tmp_path / "inf" and source.cfg == cfg
    assert source.meta["source"]["step"] == 7 and source.meta["dtype"] == "bfloat16"
    assert got.keys() == state.keys() and all(got[k].dtype == torch.bfloat16 for k in got)
    assert all(torch.equal(got[k], state[k].bfloat16()) for k in state)
    assert find_weights(tmp_path / "inf") == source
    with pytest.raises(UserError, match="is an inference directory already"):
        convert(tmp_path / "inf", tmp_path / "out")


def test_a_path_without_weights_is_named(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint.init_from='.*nothing': no complete checkpoint and no inference"):
        find_weights(tmp_path / "nothing", "checkpoint.init_from")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"  # a copy cut short: layout.json, no weights
    ckpt.mkdir(parents=True)
    (ckpt / "layout.json").write_text(json.dumps({"tp": 1, "dp": 1, "zero_stage": 1, "params": {}}))
    (ckpt.parent / "latest").write_text("step_00000010\n")
    with pytest.raises(UserError, match=r"step_00000010: no \*model_states.pt file; it is incomplete or damaged"):
        read_weights(tmp_path / "run")
    with pytest.raises(ValueError, match="weights must be one of"):
        read_weights(tmp_path / "run", "best")


def test_one_loader_for_every_config_dataclass(tmp_path):
    cfg = stage3()  # nested: ModelConfig with a Gaussian decoder (X | None), dict of streams, tuples
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_yaml(str(tmp_path / "c.yaml")) == cfg
    model = cfg.model.to_dict()
    model["encoder"]["widht"] = 64
    with pytest.raises(ValueError, match=r"unknown TransformerConfig keys \['widht'\]; known: .*'width'"):
        from_dict(RunConfig, {"model": model})
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        dataclasses.replace(cfg, precision="fp16").check()


def test_one_check_of_a_parallel_layout():
    check_layout(2, True, 8, [16, 16, 12])
    with pytest.raises(ValueError, match=r"parallel.tp=3 does not divide the world size 8"):
        check_layout(3, False, 8)
    with pytest.raises(ValueError, match="sequence_parallel needs tensor parallelism"):
        check_layout(1, True, 8)
    with pytest.raises(ValueError, match="heads 6 not divisible by tensor-parallel size 4"):
        check_layout(4, False, 8, [16, 6])


def test_the_objective_names_each_task_term():
    """Each task's own term (logged per stream by the trainer) is one that ``weigh`` sums."""
    terms = weigh(LossConfig(), dict.fromkeys(("l1", "lpips", "gram", "clip", "l1_3d", "kl", "distill", "sigmoid"),
                                              torch.zeros(())))
    assert set(Objective.TASK_TERM) == set(TASKS) and set(Objective.TASK_TERM.values()) <= set(terms) - {"total"}


def test_convert_names_the_dtypes_it_writes(tmp_path):
    """atoken-convert's --dtype is checked before anything is read: a clear error listing the choices."""
    with pytest.raises(UserError, match=r"dtype must be one of \['bf16', 'fp32'\], got 'fp16'"):
        convert(tmp_path / "no_run", tmp_path / "out", dtype="fp16")
