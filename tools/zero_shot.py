"""Understanding evaluation: zero-shot image classification and text-to-video retrieval, as a JSON report.

    python -m atoken.tools.zero_shot classify MODEL_DIR --text-tower SIGLIP2_DIR --images VAL/ --out eval/
    python -m atoken.tools.zero_shot classify MODEL_DIR --text-tower SIGLIP2_DIR --images /data/in1k-val-mds \\
        --classes imagenet_classes.txt --template "a photo of a {}." --template "a picture of a {}." --out eval/
    python -m atoken.tools.zero_shot retrieve MODEL_DIR --text-tower SIGLIP2_DIR --videos /data/msrvtt-mds --out eval/

MODEL_DIR is an inference directory (``atoken-convert``) of a model WITH the understanding (MAP) head;
SIGLIP2_DIR a local SigLIP2 checkpoint with its tokenizer (``model.understanding.TextTower``). Both
sides' embeddings are L2-normalised; similarity is their dot product (the cosine).

classify: images with integer labels, either MDS image shards written by ``atoken-make-image-shards
--labels-from-folders`` (the ``label`` column; a folder with index.json, or s3://...) or a folder of
class subfolders (label = index of the image's top-level folder among the sorted folder names, the
shard writer's rule). Class names: ``--classes FILE``, one name per line, line i = label i (required
for shards); by default a folder's subfolder names. Each class' text embedding is CLIP's prompt
ensemble: every ``--template`` filled with the name ("{}" is replaced), the normalised text
embeddings averaged and renormalised. Each image is resized as in training (longer side
``--image-res``, aspect kept, sides multiples of 16, never upscaled; 0: native size, edge-padded to
whole patches) and embedded with ``Tokenizer.embed``. Reports top-1 and top-5 accuracy (k capped at
the number of classes), the mean per-class top-1, per-class top-1, and the worst classes with the
classes they are mistaken for; OUT/confusion.npy holds the whole confusion matrix (int64 [K, K],
rows: true class, columns: top-1 prediction).

retrieve: videos with captions, either MDS video shards (``atoken-make-video-shards``; ``caption``
column) or a folder of videos with ``<stem>.txt`` captions beside them. Each video's clip is
training's understanding clip made deterministic (``eval_frame_indices``: frames at ``--fps``, at
most ``--max-frames``, cut to a multiple of 4, the window centred instead of drawn at random; a
video too short for 4 such frames gets 4 frames spread over its length), resized like images
(``--video-res``) and embedded as one sample with ``Tokenizer.embed_video``. Each caption is
embedded by the text tower (a folder's videos are decoded once in full first, to count their frames;
shards store the count). Reports recall@1/5/10 and median / mean rank for text->video (each
caption's video among all N videos) and video->text (k capped at N).

Ranks count ties against the model: the true item's rank is the number of candidates scoring at
least as high as it (itself included), so a model whose embeddings are all equal ranks everything
last, never first.

Writes OUT/report.json: model, text tower, source, N, metrics, per-item results, unreadable or
unusable items (each named, with the reason, and counted by kind), settings, versions, command.
Such items do not stop the run; a run with none usable fails. Exit status: 0 done, 1 nothing
usable, 2 bad input (a missing file or column, a model without the understanding head, ...).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from atoken.data_pipeline.images import IMAGE_EXTENSIONS, open_rgb, resize_for_training, training_size
from atoken.data_pipeline.video import VIDEO_EXTENSIONS, resize_clip
from atoken.model.config import PATCH_T
from atoken.model.errors import UserError
from atoken.tools.evaluate import input_files, is_mds, versions
from atoken.tools.shard_writer import reason, sidecar_caption

if TYPE_CHECKING:  # NOTE: imported in load_models(): the model's imports slow --help by seconds
    from atoken.model.tokenizer import Tokenizer
    from atoken.model.understanding import TextTower

DEFAULT_TEMPLATE = "a photo of a {}."
TIES = "rank = number of candidates scoring >= the true one (itself included): ties count against the model"

# Kinds of unusable items (the report counts them by kind).
UNREADABLE, NO_LABEL, OUT_OF_RANGE, NO_CAPTION = "unreadable", "no label", "label out of range", "no caption"


@dataclass
class Item:
    """One input: a decoded image [3, H, W] or clip [3, T, H, W] in [0, 1] with its label or caption,
    or why it cannot be used (``kind``: one of the kinds above, ``error``: the message)."""
    name: str
    data: torch.Tensor | None = None
    label: int = -1
    caption: str = ""
    kind: str | None = None
    error: str | None = None


def _failed(name: str, kind: str, error: str) -> Item:
    return Item(name, kind=kind, error=error)


# ------------------------------------------------------------------------------------- clips

def eval_frame_indices(num_frames: int, fps: float, und_fps: float = 1.0, max_frames: int = 64) -> np.ndarray:
    """[T] int64 frame indices of a video's evaluation clip, T a multiple of 4: training's
    understanding clip (``data_pipeline.clips.und_frame_indices``) with its window centred, not drawn."""
    if num_frames < PATCH_T:
        raise ValueError(f"the video has {num_frames} frames; a clip needs at least {PATCH_T}")
    if max_frames < PATCH_T:
        raise ValueError(f"max_frames={max_frames} cannot hold one tile of {PATCH_T} frames")
    step = max(1.0, fps / und_fps)  # source frames per sampled frame
    available = int((num_frames - 1) / step) + 1
    length = min(available, max_frames) // PATCH_T * PATCH_T
    if length < PATCH_T:
        return np.round(np.linspace(0, num_frames - 1, PATCH_T)).astype(np.int64)
    first = (available - length) // 2
    idx = np.floor((first + np.arange(length)) * step).astype(np.int64)
    return np.minimum(idx, num_frames - 1)


# ------------------------------------------------------------------------------------- inputs

def _image(data: bytes, res: int) -> torch.Tensor:
    """Encoded bytes -> [3, H, W] in [0, 1], at longer side ``res`` by the training policy (0: native)."""
    img = open_rgb(data)
    if res:
        return (resize_for_training(img, res) + 1) / 2
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def _clip(frames: torch.Tensor, res: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [3, T, h, w] in [0, 1], resized like images (0: native)."""
    if res:
        return (resize_clip(frames, *training_size(frames.shape[1], frames.shape[2], res)) + 1) / 2
    return frames.permute(3, 0, 1, 2).float() / 255


def open_mds(spec: str, columns: tuple[str, ...], hint: str):
    """StreamingDataset over MDS shards in index order (random access, no shuffle); every shard must
    have ``columns``, else a ValueError naming the shard."""
    from streaming import StreamingDataset  # NOTE: imported here, it is slow to import

    from atoken.data_pipeline.storage import resolve_location

    remote, local = resolve_location(spec, None)
    ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
    for i, shard in enumerate(ds.shards):
        have = getattr(shard, "column_names", None)
        missing = [c for c in columns if have is not None and c not in have]
        if missing:
            raw = getattr(shard, "raw_data", None)
            name = raw.basename if raw is not None else f"shard {i}"
            raise ValueError(f"{spec}: {name} has no {', '.join(missing)} column (columns: {', '.join(have)}); "
                             f"{hint}")
    return ds


def _mds_where(ds, idx: int) -> str:
    shard_id, in_shard = ds.spanner[idx]
    raw = getattr(ds.shards[shard_id], "raw_data", None)
    return f"{raw.basename if raw is not None else f'shard {shard_id}'}#{in_shard}"


def image_source(spec: str, res: int) -> tuple[str, int, list[str] | None, Iterator[Item]]:
    """(kind, items, folder class names or None, items) of ``--images``."""
    if is_mds(spec):
        ds = open_mds(spec, ("image", "label"),
                      "write the shards with atoken-make-image-shards --labels-from-folders")

        def mds_items() -> Iterator[Item]:
            for idx in range(ds.num_samples):
                where = _mds_where(ds, idx)
                try:
                    sample = ds[idx]
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    yield _failed(where, UNREADABLE, f"{reason(e)} ({where})")
                    continue
                name = str(sample.get("name") or where)
                label = int(sample["label"])
                if label < 0:
                    yield _failed(name, NO_LABEL, f"label {label} ({where}): the shards were written without "
                                                  "--labels-from-folders")
                    continue
                try:
                    yield Item(name, _image(sample["image"], res), label=label)
                except Exception as e:  # noqa: BLE001
                    yield _failed(name, UNREADABLE, f"{reason(e)} ({where})")

        return "mds", ds.num_samples, None, mds_items()

    root, paths = input_files(spec, IMAGE_EXTENSIONS, "--images", "image")
    names = [p.relative_to(root).as_posix() for p in paths]
    classes = sorted({n.split("/")[0] for n in names if "/" in n})  # as make_image_shards.class_names
    if not classes:
        raise ValueError(f"--images {spec!r}: no class subfolders (expected FOLDER/<class>/<image>)")

    def folder_items() -> Iterator[Item]:
        for p, name in zip(paths, names):
            if "/" not in name:
                yield _failed(name, NO_LABEL, "not inside a class folder (labels come from the top-level folder)")
                continue
            try:
                yield Item(name, _image(p.read_bytes(), res), label=classes.index(name.split("/")[0]))
            except Exception as e:  # noqa: BLE001
                yield _failed(name, UNREADABLE, reason(e))

    return "folder", len(paths), classes, folder_items()


def video_source(spec: str, res: int, und_fps: float, max_frames: int,
                 backend: str) -> tuple[str, int, Iterator[Item]]:
    """(kind, items, items) of ``--videos``."""
    from atoken.data_pipeline.video_decode import inspect_video, make_video_decoder

    decoder = make_video_decoder(backend)

    def load(name: str, data: bytes, frames: int | None, fps: float | None, caption: str, where: str) -> Item:
        try:
            if frames is None:
                info = inspect_video(data)
                frames, fps = info.frames, info.fps
            clip = decoder.decode(data, eval_frame_indices(frames, fps, und_fps, max_frames))
            return Item(name, _clip(clip, res), caption=caption)
        except Exception as e:  # noqa: BLE001
            return _failed(name, UNREADABLE, f"{reason(e)} ({where})")

    if is_mds(spec):
        ds = open_mds(spec, ("video", "frames", "fps", "caption"), "write the shards with atoken-make-video-shards")

        def mds_items() -> Iterator[Item]:
            for idx in range(ds.num_samples):
                where = _mds_where(ds, idx)
                try:
                    s = ds[idx]
                except Exception as e:  # noqa: BLE001
                    yield _failed(where, UNREADABLE, f"{reason(e)} ({where})")
                    continue
                name, caption = str(s.get("name") or where), (s["caption"] or "").strip()
                if not caption:
                    yield _failed(name, NO_CAPTION, f"no caption ({where}: the caption column is empty)")
                    continue
                yield load(name, s["video"], int(s["frames"]), float(s["fps"]), caption, where)

        return "mds", ds.num_samples, mds_items()

    root, paths = input_files(spec, VIDEO_EXTENSIONS, "--videos", "video")

    def folder_items() -> Iterator[Item]:
        for p in paths:
            name = p.relative_to(root).as_posix()
            try:
                caption = sidecar_caption(p)
                data = p.read_bytes()
            except Exception as e:  # noqa: BLE001
                yield _failed(name, UNREADABLE, reason(e))
                continue
            if not caption:
                txt = p.with_suffix(".txt").relative_to(root).as_posix()
                yield _failed(name, NO_CAPTION, f"no caption: {txt} is missing or empty")
                continue
            yield load(name, data, None, None, caption, name)

    return "folder", len(paths), folder_items()


def read_classes(path: str | Path) -> list[str]:
    """One class name per line (line i = label i); trailing blank lines are ignored, others refused."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for i, n in enumerate(names):
        if not n:
            raise ValueError(f"--classes {path}: line {i + 1} is blank (line i names label i - 1)")
    if not names:
        raise ValueError(f"--classes {path}: no class names")
    return names


# ------------------------------------------------------------------------------------- metrics

def true_ranks(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """scores [N, K], true [N] indices -> [N] int64 1-based rank of each row's true column (ties
    count against it: the number of columns scoring >= the true one)."""
    s = np.asarray(scores)
    return (s >= s[np.arange(s.shape[0]), true][:, None]).sum(1).astype(np.int64)


def top1_predictions(scores: np.ndarray, true: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """[N] the top-1 class of each row, a tie with the true class broken against it (so the
    prediction is the true class exactly when its rank is 1)."""
    s = np.array(scores, dtype=np.float64)
    rows = np.arange(s.shape[0])
    s[rows, true] = -np.inf
    return np.where(ranks == 1, true, s.argmax(1))


def classification_metrics(ranks: np.ndarray, preds: np.ndarray, labels: np.ndarray, class_names: list[str],
                           worst_k: int = 10) -> tuple[dict, np.ndarray]:
    """(metrics, confusion [K, K] int64) from each item's true-class rank, top-1 prediction and label.

    metrics: n, top1, top5 (k = min(5, K), ``top5_k``), mean_per_class_top1 (over classes with
    items), per_class [{index, name, n, top1}] and worst_classes (the ``worst_k`` lowest per-class
    top-1, ties by more items first, each with its 3 most frequent wrong predictions)."""
    k = len(class_names)
    ranks, preds, labels = (np.asarray(a, dtype=np.int64) for a in (ranks, preds, labels))
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    counts = confusion.sum(1)
    present = np.flatnonzero(counts)
    acc = {int(c): float(confusion[c, c] / counts[c]) for c in present}
    per_class = [{"index": int(c), "name": class_names[c], "n": int(counts[c]), "top1": acc[int(c)]} for c in present]
    worst = []
    for c in sorted(acc, key=lambda c: (acc[c], -counts[c], c))[:worst_k]:
        row = confusion[c].copy()
        row[c] = 0
        wrong = [int(j) for j in np.argsort(-row, kind="stable")[:3] if row[j] > 0]
        worst.append({"index": c, "name": class_names[c], "n": int(counts[c]), "top1": acc[c],
                      "confused_with": [{"index": j, "name": class_names[j], "count": int(row[j])} for j in wrong]})
    n = len(labels)
    k5 = min(5, k)
    metrics = {"n": n, "top1": float((ranks <= 1).mean()) if n else None,
               "top5": float((ranks <= k5).mean()) if n else None, "top5_k": k5,
               "mean_per_class_top1": float(np.mean(list(acc.values()))) if acc else None,
               "classes": k, "classes_with_items": len(present), "per_class": per_class, "worst_classes": worst}
    return metrics, confusion


def retrieval_metrics(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """sim [N, N] video x caption similarities, caption i describing video i -> for text->video (each
    caption's column) and video->text (each video's row): recall@k (k capped at N), median and mean
    rank, and the ranks themselves."""
    sim = np.asarray(sim)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"retrieval needs a square video x caption matrix, got {sim.shape}")
    out = {"n": n, "k_capped_at": n if n < max(ks) else None}
    for name, m in (("t2v", sim.T), ("v2t", sim)):
        r = true_ranks(m, np.arange(n))
        out[name] = {**{f"r{k}": float((r <= min(k, n)).mean()) for k in ks},
                     "median_rank": float(np.median(r)), "mean_rank": float(r.mean()), "ranks": r.tolist()}
    return out


# ------------------------------------------------------------------------------------- models

def load_models(model_dir: str, text_tower: str, device: str | None, max_length: int) -> tuple[Tokenizer, TextTower]:
    """The tokenizer (must have the understanding head) and the text tower, on one device; widths checked."""
    from atoken.model.tokenizer import Tokenizer
    from atoken.model.understanding import TextTower

    tok = Tokenizer.from_pretrained(model_dir, device=device)
    if tok.model.understanding is None:
        raise ValueError(f"{model_dir}: this model has no understanding head (its config.json has "
                         "understanding=false): zero-shot evaluation needs a model trained with the MAP head")
    tower = TextTower.from_pretrained(text_tower, max_length=max_length).to(tok.device)
    if tower.tokenizer is None:
        raise FileNotFoundError(f"--text-tower {text_tower}: no tokenizer files (tokenizer.json, tokenizer.model or "
                                "tokenizer_config.json) beside the weights")
    width = tok.model.cfg.encoder.width
    if tower.width != width:
        raise ValueError(f"--text-tower {text_tower}: its embeddings are {tower.width}-d, the model's ({model_dir}) "
                         f"are {width}-d: not the SigLIP2 it was trained with")
    return tok, tower


def embed_texts(tower: TextTower, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """texts -> [K, D] fp32 CPU, L2-normalised."""
    return torch.cat([tower.embed(texts[i:i + batch_size]).cpu() for i in range(0, len(texts), batch_size)])


def class_embeddings(tower: TextTower, class_names: list[str], templates: list[str],
                     batch_size: int = 256) -> torch.Tensor:
    """[K, D]: per class the mean of its prompts' normalised text embeddings, renormalised (CLIP)."""
    prompts = [t.replace("{}", c) for c in class_names for t in templates]  # class-major
    emb = embed_texts(tower, prompts, batch_size).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


# ------------------------------------------------------------------------------------- report

def _model_info(model_dir: str, tok: Tokenizer) -> dict:
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    und = tok.model.understanding
    return {"dir": str(Path(model_dir).resolve()), "weights": meta.get("weights"), "dtype": meta.get("dtype"),
            "source": meta.get("source"), "width": tok.model.cfg.encoder.width,
            "logit_scale_log": und.logit_scale.item(), "logit_bias": und.logit_bias.item()}


def _tower_info(path: str, tower: TextTower) -> dict:
    return {"dir": str(Path(path).resolve()), "max_length": tower.max_length, "width": tower.width}


def _unreadable(failed: list[Item]) -> dict:
    return {"count": len(failed), "by_kind": dict(Counter(it.kind for it in failed)),
            "items": [{"name": it.name, "kind": it.kind, "error": it.error} for it in failed]}


def _collect(items: Iterator[Item], target: int, batch_size: int, bar: tqdm, failed: list[Item],
             check=None) -> Iterator[list[Item]]:
    """Batches of usable items, up to ``target`` of them; unusable ones go to ``failed`` (and the bar)."""
    batch: list[Item] = []
    used = 0
    for item in items:
        if used + len(batch) >= target:
            break
        if item.error is None and check is not None:
            item = check(item)
        if item.error is not None:
            failed.append(item)
            bar.write(f"skipped {item.name}: {item.error}")
            bar.update(1)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            used += len(batch)
            yield batch
            batch = []
    if batch:
        yield batch


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


# ------------------------------------------------------------------------------------- runs

def classify(model_dir: str, text_tower: str, images: str, out: str | Path, *, classes: str | None = None,
             templates: list[str] | None = None, image_res: int = 256, limit: int | None = None,
             device: str | None = None, batch_size: int = 32, max_length: int = 64, worst_k: int = 10,
             progress: bool = True, command: str | None = None) -> dict:
    """Zero-shot classification; writes ``out/report.json`` and ``out/confusion.npy``, returns the report."""
    started = time.time()
    templates = templates or [DEFAULT_TEMPLATE]
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"--template {t!r} has no '{{}}' for the class name")
    tok, tower = load_models(model_dir, text_tower, device, max_length)
    kind, total, folder_classes, items = image_source(images, image_res)
    if classes is not None:
        names = read_classes(classes)
    elif folder_classes is not None:
        names = folder_classes
    else:
        raise ValueError(f"--images {images}: MDS shards carry integer labels only: pass --classes FILE "
                         "(one class name per line, line i = label i)")
    class_source = classes or f"subfolder names of {images}"
    text = class_embeddings(tower, names, templates)  # [K, D]

    def check(item: Item) -> Item:
        if not 0 <= item.label < len(names):
            return _failed(item.name, OUT_OF_RANGE, f"label {item.label} is out of range of the {len(names)} "
                                                    f"classes of {class_source} (0..{len(names) - 1})")
        return item

    failed: list[Item] = []
    ranks, preds, labels, per_item = [], [], [], []
    correct = 0
    target = total if limit is None else min(limit, total)
    bar = tqdm(total=target, desc="classify", unit="img", disable=not progress)
    for batch in _collect(items, target, batch_size, bar, failed, check):
        scores = (tok.embed([it.data for it in batch]) @ text.T).numpy()  # [B, K]
        lab = np.array([it.label for it in batch])
        r = true_ranks(scores, lab)
        p = top1_predictions(scores, lab, r)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, len(names))]
        for it, ri, pi, ti in zip(batch, r, p, top):
            per_item.append({"name": it.name, "label": it.label, "rank": int(ri), "pred": int(pi),
                             "top5": ti.tolist()})
        ranks.append(r)
        preds.append(p)
        labels.append(lab)
        correct += int((r == 1).sum())
        bar.update(len(batch))
        bar.set_postfix(top1=f"{correct / len(per_item):.3f}")
    bar.close()

    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    metrics, confusion = classification_metrics(cat(ranks), cat(preds), cat(labels), names, worst_k)
    per_class, worst = metrics.pop("per_class"), metrics.pop("worst_classes")
    out = Path(out)
    report = {
        "task": "zero-shot classification",
        "model": _model_info(model_dir, tok), "text_tower": _tower_info(text_tower, tower),
        "source": {"images": images, "kind": kind, "items": total, "limit": limit, "classes": class_source,
                   "num_classes": len(names)},
        "n": metrics["n"], "metrics": metrics, "per_class": per_class, "worst_classes": worst,
        "unreadable": _unreadable(failed),
        "settings": {"templates": templates, "text_embedding": "mean of the templates' normalised embeddings, "
                     "renormalised", "image_res": image_res or "native",
                     "resize": "longer side image_res, aspect kept, sides multiples of 16, never upscaled (bicubic)"
                     if image_res else "none (edge-padded to whole patches)",
                     "similarity": "cosine", "ties": TIES, "batch_size": batch_size, "device": str(tok.device),
                     "dtype": str(tok.dtype).removeprefix("torch."), "text_max_length": max_length,
                     "confusion": "confusion.npy: int64 [K, K], rows true class, columns top-1 prediction"},
        "per_item": per_item, "versions": versions(("transformers", "av")), "command": command,
        "seconds": round(time.time() - started, 1),
    }
    _write(out, report)
    np.save(out / "confusion.npy", confusion)
    return report


def retrieve(model_dir: str, text_tower: str, videos: str, out: str | Path, *, video_res: int = 256,
             und_fps: float = 1.0, max_frames: int = 64, limit: int | None = None, device: str | None = None,
             batch_size: int = 4, max_length: int = 64, backend: str = "auto", progress: bool = True,
             command: str | None = None) -> dict:
    """Text-to-video (and video-to-text) retrieval; writes ``out/report.json``, returns the report."""
    started = time.time()
    if und_fps <= 0:
        raise ValueError(f"--fps must be > 0, got {und_fps}")
    if max_frames < PATCH_T:
        raise ValueError(f"--max-frames must be at least {PATCH_T}, got {max_frames}")
    tok, tower = load_models(model_dir, text_tower, device, max_length)
    kind, total, items = video_source(videos, video_res, und_fps, max_frames, backend)

    failed: list[Item] = []
    kept, vid_emb = [], []
    target = total if limit is None else min(limit, total)
    bar = tqdm(total=target, desc="retrieve", unit="video", disable=not progress)
    for batch in _collect(items, target, batch_size, bar, failed):
        vid_emb.append(tok.embed_video([it.data for it in batch]))
        kept += [{"name": it.name, "caption": it.caption, "frames": int(it.data.shape[1]),
                  "size": list(it.data.shape[2:])} for it in batch]
        bar.update(len(batch))
    bar.close()

    metrics = None
    if kept:
        txt_emb = embed_texts(tower, [k["caption"] for k in kept])
        metrics = retrieval_metrics((torch.cat(vid_emb) @ txt_emb.T).numpy())
        for name in ("t2v", "v2t"):
            for k, r in zip(kept, metrics[name].pop("ranks")):
                k[f"{name}_rank"] = r
    report = {
        "task": "text-video retrieval",
        "model": _model_info(model_dir, tok), "text_tower": _tower_info(text_tower, tower),
        "source": {"videos": videos, "kind": kind, "items": total, "limit": limit},
        "n": len(kept), "metrics": metrics,
        "unreadable": _unreadable(failed),
        "settings": {"clip": f"frames at {und_fps} fps, at most {max_frames}, a multiple of 4, window centred "
                             "(eval_frame_indices); under 4 such frames: 4 spread over the video",
                     "video_res": video_res or "native",
                     "resize": "longer side video_res, aspect kept, sides multiples of 16, never upscaled "
                               "(bicubic, antialiased)" if video_res else "none (edge-padded to whole patches)",
                     "similarity": "cosine", "ties": TIES, "batch_size": batch_size, "device": str(tok.device),
                     "dtype": str(tok.dtype).removeprefix("torch."), "text_max_length": max_length,
                     "decode_backend": backend},
        "per_item": kept, "versions": versions(("transformers", "av")), "command": command,
        "seconds": round(time.time() - started, 1),
    }
    _write(Path(out), report)
    return report


# ------------------------------------------------------------------------------------- CLI

def _res_arg(v: str) -> int:
    res = int(v)
    if res < 0 or res % 16:
        raise argparse.ArgumentTypeError(f"must be 0 (native) or a positive multiple of 16, got {v}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="atoken-zero-shot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="{classify,retrieve}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="inference directory with the understanding head (from atoken-convert)")
        sp.add_argument("--text-tower", required=True,
                        help="local SigLIP2 directory (save_pretrained of Siglip2Model or Siglip2TextModel) "
                             "with its tokenizer: the text tower the model was trained against")
        sp.add_argument("--out", required=True, help="report folder: report.json is written there")
        sp.add_argument("--limit", type=int, default=None, help="evaluate the first N usable items only")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--max-length", type=int, default=64, help="text tokens per prompt/caption (default 64, "
                                                                   "SigLIP's padding length)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("classify", help="zero-shot image classification: top-1/top-5 accuracy",
                       description="Zero-shot classification of labelled images (see atoken-zero-shot --help).")
    common(c)
    c.add_argument("--images", required=True,
                   help="MDS image shards with a label column (folder with index.json, or s3://...), or a folder "
                        "of class subfolders")
    c.add_argument("--classes", default=None,
                   help="class names, one per line, line i = label i (default: a folder's sorted subfolder names; "
                        "required for shards)")
    c.add_argument("--template", action="append", default=None,
                   help=f"prompt template, {{}} = class name; repeat to average several (default {DEFAULT_TEMPLATE!r})")
    c.add_argument("--image-res", type=_res_arg, default=256,
                   help="longer side images are resized to, as in training (default 256; 0: native size)")
    c.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    c.add_argument("--worst-k", type=int, default=10, help="worst classes listed with their confusions (default 10)")

    r = sub.add_parser("retrieve", help="text-to-video and video-to-text retrieval: recall@1/5/10, median rank",
                       description="Caption-video retrieval (see atoken-zero-shot --help).")
    common(r)
    r.add_argument("--videos", required=True,
                   help="MDS video shards (folder with index.json, or s3://...), or a folder of videos with "
                        "<stem>.txt captions beside them")
    r.add_argument("--video-res", type=_res_arg, default=256,
                   help="longer side frames are resized to, as in training (default 256; 0: native size)")
    r.add_argument("--fps", type=float, default=1.0, help="clip frame rate (default 1, training's und_fps)")
    r.add_argument("--max-frames", type=int, default=64, help="frames per clip at most (default 64)")
    r.add_argument("--batch-size", type=int, default=4, help="videos per forward pass (default 4)")
    r.add_argument("--decode-backend", default="auto", choices=["auto", "pyav", "dali-cpu", "dali-gpu"],
                   help="video decoder (default auto: DALI where it reads the codec, else PyAV)")

    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "atoken.tools.zero_shot", *argv])
    try:
        if args.task == "classify":
            report = classify(args.model, args.text_tower, args.images, args.out, classes=args.classes,
                              templates=args.template, image_res=args.image_res, limit=args.limit,
                              device=args.device, batch_size=args.batch_size, max_length=args.max_length,
                              worst_k=args.worst_k, progress=not args.no_progress, command=command)
        else:
            report = retrieve(args.model, args.text_tower, args.videos, args.out, video_res=args.video_res,
                              und_fps=args.fps, max_frames=args.max_frames, limit=args.limit, device=args.device,
                              batch_size=args.batch_size, max_length=args.max_length,
                              backend=args.decode_backend, progress=not args.no_progress, command=command)
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, bad = report["metrics"], report["unreadable"]  # (each skipped item was printed as it was met)
    if not report["n"]:
        print(f"error: no usable item of {report['source']['items']} ({bad['count']} skipped, by kind "
              f"{bad['by_kind']}); report: {Path(args.out) / 'report.json'}", file=sys.stderr)
        return 1
    if args.task == "classify":
        print(f"{report['n']} images, {m['classes']} classes: top-1 {m['top1']:.4f}, top-{m['top5_k']} "
              f"{m['top5']:.4f}, mean per-class top-1 {m['mean_per_class_top1']:.4f}; {bad['count']} skipped")
    else:
        t, v = m["t2v"], m["v2t"]
        print(f"{report['n']} videos: text->video R@1 {t['r1']:.4f} R@5 {t['r5']:.4f} R@10 {t['r10']:.4f} "
              f"median rank {t['median_rank']:g}; video->text R@1 {v['r1']:.4f} R@5 {v['r5']:.4f} "
              f"R@10 {v['r10']:.4f} median rank {v['median_rank']:g}; {bad['count']} skipped")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
