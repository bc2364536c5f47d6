"""Understanding evaluation: zero-shot image classification and text-to-video retrieval, as
``atoken-zero-shot`` describes: ``classify`` and ``retrieve`` each write ``OUT/report.json``."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from atoken.data_pipeline.clips import und_frame_indices
from atoken.data_pipeline.images import IMAGE_EXTENSIONS
from atoken.data_pipeline.video import VIDEO_EXTENSIONS
from atoken.data_pipeline.video_decode import make_video_decoder
from atoken.model.config import PATCH_T
from atoken.model.inference_dir import read_inference_config
from atoken.model.tokenizer import Tokenizer
from atoken.model.understanding import TextTower
from atoken.tools.shard_writer import reason, sidecar_caption

from .inputs import (
    NO_CAPTION,
    NO_LABEL,
    OUT_OF_RANGE,
    Item,
    failed,
    input_files,
    is_mds,
    mds_items,
    read_clip,
    read_image,
    resized_clip,
)
from .ranking import DEFAULT_TEMPLATE, TIES, classification_metrics, retrieval_metrics, top1_predictions, true_ranks
from .report import versions, write_report

if TYPE_CHECKING:
    from atoken.model.tokenizer import Tokenizer
    from atoken.model.understanding import TextTower


# ------------------------------------------------------------------------------------- inputs

def labelled_images(spec: str, res: int) -> tuple[str, int, list[str] | None, Iterator[Item]]:
    """(kind, items, folder class names or None, items) of ``--images``: MDS image shards with a
    ``label`` column, or a folder of class subfolders (label = index of the top-level folder)."""
    def item(name: str, data: bytes, label: int) -> Item:
        try:
            return Item(name, read_image(data, res), label=label)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            return failed(name, reason(e))

    if is_mds(spec):
        def decode(name: str, sample: dict) -> Item:
            label = int(sample["label"])
            if label < 0:
                return failed(name, f"label {label}: the shards were written without --labels-from-folders",
                              NO_LABEL)
            return item(name, sample["image"], label)

        total, items = mds_items(spec, decode, ("image", "label"),
                                 "write the shards with atoken-make-image-shards --labels-from-folders")
        return "mds", total, None, items

    root, paths = input_files(spec, IMAGE_EXTENSIONS, "--images", "image")
    names = [p.relative_to(root).as_posix() for p in paths]
    classes = sorted({n.split("/")[0] for n in names if "/" in n})  # as make_image_shards.class_names
    if not classes:
        raise ValueError(f"--images {spec!r}: no class subfolders (expected FOLDER/<class>/<image>)")

    def folder_items() -> Iterator[Item]:
        for p, name in zip(paths, names, strict=True):
            if "/" not in name:
                yield failed(name, "not inside a class folder (labels come from the top-level folder)", NO_LABEL)
            else:
                yield item(name, p.read_bytes(), classes.index(name.split("/")[0]))

    return "folder", len(paths), classes, folder_items()


def captioned_videos(spec: str, res: int, und_fps: float, max_frames: int,
                     backend: str) -> tuple[str, int, Iterator[Item]]:
    """(kind, items, items) of ``--videos``: MDS video shards, or video files with ``<stem>.txt``
    captions. Each clip is training's understanding clip with its window centred
    (``data_pipeline.clips.und_frame_indices`` without a generator)."""
    decoder = make_video_decoder(backend)

    def frames_of(frames: int, fps: float) -> np.ndarray:
        return und_frame_indices(frames, fps, None, und_fps, max_frames)

    def load(name: str, data: bytes, caption: str, frames: int | None = None, fps: float | None = None) -> Item:
        try:
            clip, _ = read_clip(data, frames_of, decoder, frames, fps)
            return Item(name, resized_clip(clip, res), caption=caption)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            return failed(name, reason(e))

    if is_mds(spec):
        def decode(name: str, s: dict) -> Item:
            caption = (s["caption"] or "").strip()
            if not caption:
                return failed(name, "no caption (the caption column is empty)", NO_CAPTION)
            return load(name, s["video"], caption, int(s["frames"]), float(s["fps"]))

        total, items = mds_items(spec, decode, ("video", "frames", "fps", "caption"),
                                 "write the shards with atoken-make-video-shards")
        return "mds", total, items

    root, paths = input_files(spec, VIDEO_EXTENSIONS, "--videos", "video")

    def folder_items() -> Iterator[Item]:
        for p in paths:
            name = p.relative_to(root).as_posix()
            try:
                caption = sidecar_caption(p)
                data = p.read_bytes()
            except Exception as e:  # noqa: BLE001 - any unreadable file: name it, go on
                yield failed(name, reason(e))
                continue
            if not caption:
                txt = p.with_suffix(".txt").relative_to(root).as_posix()
                yield failed(name, f"no caption: {txt} is missing or empty", NO_CAPTION)
                continue
            yield load(name, data, caption)

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


# ------------------------------------------------------------------------------------- models

def load_models(model_dir: str, text_tower: str, device: str | None, max_length: int) -> tuple[Tokenizer, TextTower]:
    """The tokenizer (must have the understanding head) and the text tower, on one device; widths checked."""
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

    meta = read_inference_config(model_dir)[1]
    und = tok.model.understanding
    return {"dir": str(Path(model_dir).resolve()), "weights": meta.get("weights"), "dtype": meta.get("dtype"),
            "source": meta.get("source"), "width": tok.model.cfg.encoder.width,
            "logit_scale_log": und.logit_scale.item(), "logit_bias": und.logit_bias.item()}


def _tower_info(path: str, tower: TextTower) -> dict:
    return {"dir": str(Path(path).resolve()), "max_length": tower.max_length, "width": tower.width}


def _unreadable(unusable: list[Item]) -> dict:
    return {"count": len(unusable), "by_kind": dict(Counter(it.kind for it in unusable)),
            "items": [{"name": it.name, "kind": it.kind, "error": it.error} for it in unusable]}


def _collect(items: Iterator[Item], target: int, batch_size: int, bar: tqdm, unusable: list[Item],
             check=None) -> Iterator[list[Item]]:
    """Batches of usable items, up to ``target`` of them; unusable ones go to ``unusable`` (and the bar)."""
    batch: list[Item] = []
    used = 0
    for item in items:
        if used + len(batch) >= target:
            break
        if item.error is None and check is not None:
            item = check(item)
        if item.error is not None:
            unusable.append(item)
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
    kind, total, folder_classes, items = labelled_images(images, image_res)
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
            return failed(item.name, f"label {item.label} is out of range of the {len(names)} classes of "
                                     f"{class_source} (0..{len(names) - 1})", OUT_OF_RANGE)
        return item

    unusable: list[Item] = []
    ranks, preds, labels, per_item = [], [], [], []
    correct = 0
    target = total if limit is None else min(limit, total)
    bar = tqdm(total=target, desc="classify", unit="img", disable=not progress)
    for batch in _collect(items, target, batch_size, bar, unusable, check):
        scores = (tok.embed([it.data for it in batch]) @ text.T).numpy()  # [B, K]
        lab = np.array([it.label for it in batch])
        r = true_ranks(scores, lab)
        p = top1_predictions(scores, lab, r)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, len(names))]
        for it, ri, pi, ti in zip(batch, r, p, top, strict=True):
            per_item.append({"name": it.name, "label": it.label, "rank": int(ri), "pred": int(pi),
                             "top5": ti.tolist()})
        ranks.append(r)
        preds.append(p)
        labels.append(lab)
        correct += int((r == 1).sum())
        bar.update(len(batch))
        bar.set_postfix(top1=f"{correct / len(per_item):.3f}")
    bar.close()

    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731 - a one-line local helper
    metrics, confusion = classification_metrics(cat(ranks), cat(preds), cat(labels), names, worst_k)
    per_class, worst = metrics.pop("per_class"), metrics.pop("worst_classes")
    out = Path(out)
    report = {
        "task": "zero-shot classification",
        "model": _model_info(model_dir, tok), "text_tower": _tower_info(text_tower, tower),
        "source": {"images": images, "kind": kind, "items": total, "limit": limit, "classes": class_source,
                   "num_classes": len(names)},
        "n": metrics["n"], "metrics": metrics, "per_class": per_class, "worst_classes": worst,
        "unreadable": _unreadable(unusable),
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
    report = write_report(out, report)
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
    kind, total, items = captioned_videos(videos, video_res, und_fps, max_frames, backend)

    unusable: list[Item] = []
    kept, vid_emb = [], []
    target = total if limit is None else min(limit, total)
    bar = tqdm(total=target, desc="retrieve", unit="video", disable=not progress)
    for batch in _collect(items, target, batch_size, bar, unusable):
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
            for k, r in zip(kept, metrics[name].pop("ranks"), strict=True):
                k[f"{name}_rank"] = r
    report = {
        "task": "text-video retrieval",
        "model": _model_info(model_dir, tok), "text_tower": _tower_info(text_tower, tower),
        "source": {"videos": videos, "kind": kind, "items": total, "limit": limit},
        "n": len(kept), "metrics": metrics,
        "unreadable": _unreadable(unusable),
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
    return write_report(Path(out), report)
