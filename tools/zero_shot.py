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
training's understanding clip made deterministic (``data_pipeline.clips.und_frame_indices`` without a
generator: frames at ``--fps``, at
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

The work is done by ``atoken.tools.eval`` (``understanding.classify`` / ``retrieve``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from atoken.model.errors import UserError
from atoken.tools.eval.ranking import DEFAULT_TEMPLATE


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
    from atoken.tools.eval.understanding import classify, retrieve  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

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
