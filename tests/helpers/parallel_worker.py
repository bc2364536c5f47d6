"""Two-process checks of training/parallelize.py, run by tests/integration/test_parallel.py under torchrun (gloo):

    torchrun --nproc_per_node 2 tests/helpers/parallel_worker.py OUT.json

One launch runs every case (the imports cost more than the checks). A case builds the plain model,
parallelizes it at a layout and takes one optimizer step through its DeepSpeed engine
(``training.parallelize.parallelize``, torch AdamW, clipping on) on packed batches of 3 images with odd token counts
(13 and 11: sequence
parallelism pads them), and compares with a plain single-process TP=1 reference computed here, on
every rank, from the same seed:

- ``recon_err``, ``loss_err``: reconstruction and loss terms of the rank's micro-batch;
- ``grad_err``: each gradient as the parameter receives it (after the TP reduction hooks, before
  DeepSpeed's reduction), gathered over TP;
- ``norm_err``: DeepSpeed's global grad norm against the reference norm of the DP-mean gradient;
- ``weight_err``, ``update_err``: the updated weights, gathered over TP (and over DP under ZeRO-3),
  and their change, against the reference's AdamW step after clipping.

Errors are max |a - b| / max |b| per tensor, the worst tensor reported. The clip value is half the
smaller reference norm, so clipping scales every step.

The step is the trainer's own (``training.train.micro_step``) with the trainer's ``Objective``.
NOTE: two deliberate departures from the production weights, both to keep the comparison tight:
- the loss is ``L1 + 0.01 * KL`` (LPIPS and Gram weighted 0, KL weighted so its gradient
  is not lost under the L1's): the LPIPS/Gram terms route gradients through max-pools, and a 4e-7
  difference in the reconstruction (what a TP reduction order gives) flipped near-tied maxima in
  an upsampled image and moved its gradient by 5e-3. Nothing of the perceptual net is parallel.
- Adam's first step is ~ lr * sign(g), blind to the gradient's scale and so to a wrong clipping
  coefficient; both sides use eps comparable to the gradients, so the step depends on its scale.

The semantic cases (``SEM_CASES``) check the global-batch semantic losses: the understanding head
on 3 images on DP rank 0 and 2 on DP rank 1, with their text and teacher embeddings (stand-ins for
the frozen towers' outputs; the texts are leaves that take gradients, so the all-gather's backward
is checked too), scored by ``sigmoid_loss`` and ``distill_loss`` over the data-parallel group and
summed by the objective's ``weigh``. The reference is one process over the union of both ranks'
samples (at TP=2, DP=1: the one batch, so a gather over the wrong group, which would see the TP
ranks' copies as more negatives, fails):

- ``loss_err``: the DP mean of each rank's terms against the union's;
- ``grad_err``: the DP mean of the parameters' gradients (what DeepSpeed's averaging gives) and
  each rank's text gradient against the union's;
- ``norm_err``, ``weight_err``, ``update_err`` as above.

Rank 0 writes {case: {metric: [value per rank]}} plus the RNG-tracker facts as JSON.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from atoken.model import AToken, PackedBatch, patchify, preset
from atoken.model.losses import LossConfig
from atoken.model.objective import Objective, weigh
from atoken.model.understanding import distill_loss, sigmoid_loss
from atoken.training import distributed, megatron_cpu
from atoken.training.config import RunConfig
from atoken.training.engine import param_groups
from atoken.training.parallelize import TP_PARTIAL_GRAD, full_state_dict, init_parallel, parallelize, shard_model
from atoken.training.schedule import lr_factor
from atoken.training.train import micro_step

SEED, NOISE_SEED = 1234, 99
ADAM_EPS = 1e-2
KL_WEIGHT = 1e-2
# name: (tp, sequence_parallel, zero stage, mix_rounds, activation checkpointing); DP = 2 // tp.
CASES = {
    "tp2_zero1": (2, False, 1, 1, False),
    "tp2_sp_zero1": (2, True, 1, 1, False),
    "tp2_sp_zero2": (2, True, 2, 1, False),
    "tp2_sp_zero3": (2, True, 3, 1, False),
    "tp2_zero3": (2, False, 3, 1, False),
    "tp2_sp_zero2_accum2_ckpt": (2, True, 2, 2, True),
    "dp2_zero1": (1, False, 1, 1, False),
    "dp2_zero2": (1, False, 2, 1, False),
    "dp2_zero3": (1, False, 3, 1, False),
}
# name: (tp, zero stage) of the semantic cases; DP = 2 // tp.
SEM_CASES = {"sem_dp2_zero1": (1, 1), "sem_dp2_zero3": (1, 3), "sem_tp2_zero1": (2, 1), "sem_tp2_zero3": (2, 3)}
SEM_KEYS = ("sigmoid", "distill", "total")
DISTILL_SCALE, DISTILL_T = 10.0, 2.0


def model_config():
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):  # encoder: LayerNorm + biases; decoder: RMSNorm + QK-norm
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, 64, 4, 128  # head_dim 16: 2 heads per TP rank
    cfg.latent_channels = 8
    return cfg


def run_config(clip: float) -> RunConfig:
    cfg = RunConfig(model=model_config(), steps=10, precision="fp32")  # encoder LR stays x0.1
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 0.1, 0, clip
    return cfg


def batches() -> list[PackedBatch]:
    """Two packed micro-batches of 3 images each: 6 + 3 + 4 = 13 and 6 + 3 + 2 = 11 tokens."""
    g = torch.Generator().manual_seed(0)
    out = []
    for sizes in ([(48, 32), (16, 48), (32, 32)], [(32, 48), (48, 16), (32, 16)]):
        parts = []
        for h, w in sizes:
            f, c, grid = patchify(torch.rand(3, h, w, generator=g) * 2 - 1)
            parts.append((f, c, grid, "image", 1))
        out.append(PackedBatch.cat(parts, names=[f"{h}x{w}" for h, w in sizes]))
    return out


# The trainer's objective with L1 and KL alone weighted (see the NOTE above): total = L1 + KL_WEIGHT * KL.
# LPIPS and Gram weighted 0: the perceptual net does not run.
LOSS = LossConfig(rec_weight=1.0, kl_weight=KL_WEIGHT, lpips_weight=0.0, gram_weight=0.0, clip_weight=0.0,
                  perceptual_size=64)
TERMS = ("l1", "kl", "total")


def noise(b: int) -> torch.Generator:
    """Micro-batch ``b``'s posterior noise: its own stream, the same on every rank."""
    return torch.Generator().manual_seed(NOISE_SEED + b)


def forward_loss(model, objective, batch: PackedBatch, b: int, amp=nullcontext()) -> tuple[torch.Tensor, dict]:  # noqa: B008 - stateless, shared safely
    """Micro-batch ``b`` -> (recon, loss terms), without an engine. ``amp`` covers the model only.
    NOTE: the objective sees the reconstruction in fp32: CPU has no bf16 antialiased resize (the
    perceptual net's input), which CUDA has."""
    with amp:
        out = model(batch, generator=noise(b))
    recon = out.recon
    losses = objective(batch, dataclasses.replace(out, recon=recon.float()), [{}] * batch.num_samples,
                       ("rec",))
    return recon, {k: losses[k] for k in TERMS}


def reference(cfg, data, objective) -> dict:
    """The TP=1 model in this process: per-batch recon, losses and grads; the mean grads and norms
    of the micro-batch sets a step averages over ("one": batch 0; "both": batches 0 and 1)."""
    torch.manual_seed(SEED)
    model = AToken(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    recons, losses, grads = [], [], []
    for b, batch in enumerate(data):
        model.zero_grad()
        recon, out = forward_loss(model, objective, batch, b)
        out["total"].backward()
        recons.append(recon.detach())
        losses.append({k: v.item() for k, v in out.items()})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    steps = {}
    for key, used in (("one", [0]), ("both", [0, 1])):
        mean = {n: sum(grads[b][n] for b in used) / len(used) for n in init}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in mean.values()])).item()
        steps[key] = {"norm": norm, "mean_grad": mean}
    return {"init": init, "recons": recons, "losses": losses, "grads": grads, "steps": steps}


def reference_step(cfg, init: dict, mean_grad: dict, run: RunConfig, eps: float = ADAM_EPS) -> dict:
    """build_engine's optimizer step on the plain model: same groups, schedule, clipping (and eps)."""
    model = AToken(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(init[n])
            p.grad = mean_grad[n].clone()
    o = run.optim
    opt = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=o.warmup_steps, total=run.steps, peak=o.lr, floor=o.min_lr))
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    opt.step()
    sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def worst(errs: dict[str, float]) -> tuple[float, str]:
    name = max(errs, key=errs.get)
    return errs[name], name


def gather_tp(dims, t: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    if not (dims.tensor_parallel and p.tensor_model_parallel):
        return t
    parts = [torch.empty_like(t) for _ in range(dims.tp)]
    dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=p.partition_dim)


def run_case(case: tuple, cfg, data, ref: dict, ref_steps: dict, run: RunConfig, objective) -> dict:
    tp, sp, zero, rounds, ckpt = case
    t0 = time.perf_counter()
    dims = init_parallel(tp=tp, sequence_parallel=sp, seed=SEED)
    # Each DP rank its own micro-batch, the TP ranks of a group the same; with accumulation, all.
    micro = list(range(len(data))) if rounds > 1 else [dims.dp_rank]
    key = "both" if dims.dp * len(micro) > 1 else "one"
    torch.manual_seed(SEED)
    sharded = shard_model(AToken(cfg), dims)  # parallelize's first step alone, before any engine
    res = {"state_keys_match": set(sharded.state_dict()) == set(ref["init"])}  # the plain model's names
    sharded.load_state_dict(sharded.state_dict())  # strict: megatron's extra state is gone
    del sharded
    torch.manual_seed(SEED)
    model = AToken(cfg)
    run.parallel.zero_stage, run.parallel.activation_checkpointing, run.mix_rounds = zero, ckpt, rounds
    engine = parallelize(model, dims, run, torch.device("cpu"))
    captured = {}
    for name, p in model.named_parameters():  # registered after shard_model's hooks: sees reduced grads
        p.register_hook(lambda g, name=name: captured.__setitem__(name, g.detach().clone()))
    for group in engine.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    res.update(recon_err=0.0, loss_err=0.0, grad_err=0.0, grad_err_at="", losses=[])
    params = dict(model.named_parameters())
    recons = []
    model.register_forward_hook(lambda module, args, out: recons.append(out.recon.detach()))
    for b in micro:
        out = micro_step(engine, objective, data[b], [{}] * data[b].num_samples, ("rec",), noise(b), nullcontext())
        recon = recons[-1]
        res["recon_err"] = max(res["recon_err"], rel(recon.detach(), ref["recons"][b]))
        res["loss_err"] = max([res["loss_err"]] + [abs(out[k].item() - v) / abs(v)
                                                   for k, v in ref["losses"][b].items()])
        res["losses"].append(out["total"].item())
        # DeepSpeed divides the loss by its accumulation steps (one micro-batch a round: rounds).
        err, at = worst({n: rel(gather_tp(dims, captured[n], params[n]), ref["grads"][b][n] / rounds) for n in params})
        if err >= res["grad_err"]:
            res["grad_err"], res["grad_err_at"] = err, at
    res["norm"], res["ref_norm"] = float(engine.get_global_grad_norm()), ref["steps"][key]["norm"]
    res["norm_err"] = abs(res["norm"] - res["ref_norm"]) / res["ref_norm"]
    res["clip"] = run.optim.grad_clip
    weights, want, init = full_state_dict(engine, dims), ref_steps[key], ref["init"]
    res["weight_err"], res["weight_err_at"] = worst({n: rel(weights[n], want[n]) for n in want})
    res["update_err"], res["update_err_at"] = worst({n: rel(weights[n] - init[n], want[n] - init[n]) for n in want})
    res["partial_grad_params"] = sorted(n for n, p in params.items() if getattr(p, TP_PARTIAL_GRAD, False))
    res["tp_split"] = {n: p.partition_dim for n, p in params.items() if p.tensor_model_parallel}
    res["seconds"] = time.perf_counter() - t0
    del engine, model, params
    gc.collect()
    return res


def rng_case() -> dict:
    """megatron's RNG tracker at TP=2: the default stream shared, the model-parallel one per rank."""
    init_parallel(tp=2, seed=SEED)
    shared = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        per_rank = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(SEED)
    torch.rand(4)
    return {"shared": shared.tolist(), "per_rank": per_rank.tolist(),
            "default_continues": bool(torch.equal(after, torch.rand(4)))}  # as if the fork never ran


def bf16_case(cfg, data, ref: dict, objective) -> dict:
    """TP=2 with sequence parallelism under CPU bf16 autocast: runs, and lands near fp32."""
    dims = init_parallel(tp=2, sequence_parallel=True, seed=SEED)
    torch.manual_seed(SEED)
    model = shard_model(AToken(cfg), dims)
    recon, out = forward_loss(model, objective, data[0], 0, torch.autocast("cpu", dtype=torch.bfloat16))
    out["total"].backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
    return {"loss_err": abs(out["total"].item() - ref["losses"][0]["total"]) / ref["losses"][0]["total"],
            "recon_dtype": str(recon.dtype), "grads_finite": bool(grads_finite)}


# ------------------------------------------------------------------ global-batch semantic losses

def sem_data() -> dict:
    """Rank 0's 3 images and rank 1's 2 (unequal: the gather pads), their texts and teacher
    embeddings [b, 64], and the union of both packed in rank order."""
    g = torch.Generator().manual_seed(1)
    parts = [[(*patchify(torch.rand(3, h, w, generator=g) * 2 - 1), "image", 1) for h, w in sizes]
             for sizes in ([(32, 48), (16, 32), (48, 16)], [(32, 32), (16, 16)])]
    width = model_config().encoder.width
    unit = lambda n: F.normalize(torch.randn(n, width, generator=g), dim=-1)  # noqa: E731 - a one-line local helper
    return {"batches": [PackedBatch.cat(p) for p in parts], "union": PackedBatch.cat(parts[0] + parts[1]),
            "txt": [unit(len(p)) for p in parts], "tea": [unit(len(p)) for p in parts]}


def sem_loss(out, txt: torch.Tensor, tea: torch.Tensor, group) -> dict:
    """Both semantic terms on the same images. NOTE: not ``Objective`` itself: it embeds the captions
    with a frozen text tower (no gradient to check) and scores images by distillation alone."""
    emb, zero = out.embedding, torch.zeros(())
    s = sigmoid_loss(emb, txt, out.logit_scale, out.logit_bias, group=group)
    d = distill_loss(emb, tea, txt, DISTILL_SCALE, DISTILL_T, group=group)
    terms = dict.fromkeys(("l1", "lpips", "gram", "clip", "l1_3d", "kl"), zero)
    return weigh(LossConfig(), {**terms, "sigmoid": s, "distill": d})


def sem_reference(cfg, data) -> dict:
    """One process: "one" = rank 0's batch alone, "both" = the union. Parameters the loss does not
    reach (latent, decoder) get zero gradients, as DeepSpeed gives them."""
    torch.manual_seed(SEED)
    model = AToken(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {"init": init}
    for key, used in (("one", [0]), ("both", [0, 1])):
        model.zero_grad()
        batch = data["batches"][0] if key == "one" else data["union"]
        txt = torch.cat([data["txt"][b] for b in used]).requires_grad_(True)
        losses = sem_loss(model(batch, tasks=("und",)), txt, torch.cat([data["tea"][b] for b in used]), None)
        losses["total"].backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
        out[key] = {"losses": {k: v.item() for k, v in losses.items()}, "mean_grad": grads, "norm": norm,
                    "reached": {n for n, p in model.named_parameters() if p.grad is not None},
                    "txt_grad": txt.grad.split([len(data["txt"][b]) for b in used])}
    return out


def run_semantic_case(case: tuple, cfg, data, ref: dict, ref_steps: dict, run: RunConfig) -> dict:
    tp, zero = case
    t0 = time.perf_counter()
    dims = init_parallel(tp=tp, seed=SEED)
    key, b = ("both" if dims.dp > 1 else "one"), dims.dp_rank
    group = dims.dp_group if dims.dp > 1 else None  # as train.py gives the objective
    torch.manual_seed(SEED)
    model = AToken(cfg)
    run.parallel.zero_stage, run.parallel.activation_checkpointing, run.mix_rounds = zero, False, 1
    engine = parallelize(model, dims, run, torch.device("cpu"))
    captured = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: captured.__setitem__(name, g.detach().clone()))
    for g in engine.optimizer.param_groups:
        g["eps"] = run.optim.grad_clip  # see semantic_cases
    txt = data["txt"][b].clone().requires_grad_(True)
    losses = sem_loss(engine(data["batches"][b], tasks=("und",)), txt, data["tea"][b], group)
    engine.backward(losses["total"])
    engine.step()

    def dp_mean(t: torch.Tensor) -> torch.Tensor:
        if dims.dp > 1:
            t = t.clone()
            dist.all_reduce(t, group=dims.dp_group)
        return t / dims.dp

    want = ref[key]
    got = dp_mean(torch.tensor([losses[k].item() for k in SEM_KEYS], dtype=torch.float64))
    res = {"losses": [losses[k].item() for k in SEM_KEYS],
           "loss_err": max(abs(g - want["losses"][k]) / abs(want["losses"][k])
                           for g, k in zip(got.tolist(), SEM_KEYS, strict=True)),
           "reached_match": set(captured) == want["reached"]}
    params = dict(model.named_parameters())
    errs = {n: rel(gather_tp(dims, dp_mean(captured[n]), params[n]), want["mean_grad"][n]) for n in sorted(captured)}
    errs["<text embeddings>"] = rel(txt.grad / dims.dp, want["txt_grad"][b])
    res["grad_err"], res["grad_err_at"] = worst(errs)
    res["norm"], res["ref_norm"] = float(engine.get_global_grad_norm()), want["norm"]
    res["norm_err"] = abs(res["norm"] - res["ref_norm"]) / res["ref_norm"]
    res["clip"] = run.optim.grad_clip
    weights, step, init = full_state_dict(engine, dims), ref_steps[key], ref["init"]
    # A zero-initialised parameter (the biases) is its update alone: update_err checks it.
    res["weight_err"], res["weight_err_at"] = worst({n: rel(weights[n], step[n]) for n in step if init[n].any()})
    moved = {n for n in step if not torch.equal(step[n], init[n])}
    res["update_err"], res["update_err_at"] = worst({n: rel(weights[n] - init[n], step[n] - init[n]) for n in moved})
    res["seconds"] = time.perf_counter() - t0
    del engine, model, params
    gc.collect()
    return res


def semantic_cases() -> dict:
    cfg = dataclasses.replace(model_config(), understanding=True)
    data = sem_data()
    ref = sem_reference(cfg, data)
    run = run_config(clip=0.5 * min(ref[k]["norm"] for k in ("one", "both")))
    # NOTE: Adam's eps = the clip value, above every clipped gradient element: the step is then
    # ~ lr * g / eps, linear in the gradient (so in the clipping coefficient too). With eps inside
    # the gradients' range, an element g << eps moves by lr * g / eps and the largest by ~lr, which
    # multiplies the gradient's fp32 error by max|g| / eps in the step (measured 1e-4 at eps 1e-2).
    ref_steps = {k: reference_step(cfg, ref["init"], ref[k]["mean_grad"], run, eps=run.optim.grad_clip)
                 for k in ("one", "both")}
    return {name: run_semantic_case(case, cfg, data, ref, ref_steps, run) for name, case in SEM_CASES.items()}


def main(out_path: str) -> None:
    t0 = time.perf_counter()
    info = distributed.init()
    cfg, data, objective = model_config(), batches(), Objective(LOSS)
    ref = reference(cfg, data, objective)
    run = run_config(clip=0.5 * min(s["norm"] for s in ref["steps"].values()))
    ref_steps = {k: reference_step(cfg, ref["init"], s["mean_grad"], run) for k, s in ref["steps"].items()}
    patched = megatron_cpu.apply_if_no_cuda()  # the first call; init_parallel's find it done
    results = {"rng": rng_case(), "token_counts": [d.num_tokens for d in data],
               "shim": {"patched": patched, "again": megatron_cpu.apply_if_no_cuda() == patched,
                        "cuda_available": torch.cuda.is_available()}}
    for name, case in CASES.items():
        results[name] = run_case(case, cfg, data, ref, ref_steps, run, objective)
    results["bf16"] = bf16_case(cfg, data, ref, objective)
    results.update(semantic_cases())
    results["worker_seconds"] = time.perf_counter() - t0
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, results)
    if info.is_main:
        merged = {k: {m: [r[k][m] for r in gathered] for m in v} if isinstance(v, dict) else v
                  for k, v in results.items()}
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)
    distributed.shutdown()


if __name__ == "__main__":  # NOTE: required: without it, torchrun workers hang in dist_checkpointing
    main(sys.argv[1])
