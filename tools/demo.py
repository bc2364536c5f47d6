"""The end-to-end demo: a real stage-1 run of ``tiny`` on CPU with photos that ship in packages.

    python -m atoken.tools.demo            # (what `make demo` runs)

1. Copies the photos bundled with scikit-image and scikit-learn into ``<run-dir>/photos`` and holds
   one out (``chelsea.png``) in ``<run-dir>/holdout``.
2. Writes the training photos as MDS shards (``tools/make_image_shards.py``).
3. Trains the ``demo`` config (``training/stages.py``): a few minutes on 2 CPU cores; the trainer
   reports the held-out PSNR at step 0 and at every evaluation.
4. Converts the last checkpoint to ``<run-dir>/inference`` and reconstructs the held-out photo with
   it, printing its PSNR at step 0 and after training.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from atoken.model.errors import cli
from atoken.tools.make_image_shards import write_image_shards
from atoken.training import train

# NOTE: scikit-image, scikit-learn and the model are imported where used: --help stays fast.

# Natural photos among scikit-image's bundled files (the rest are masks, charts and text).
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
                  "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg"]
HELD_OUT = "chelsea.png"


def bundled_photos() -> list[Path]:
    import skimage.data  # noqa: PLC0415 - a dev extra (scikit-image): only the demo's photos
    import sklearn.datasets  # noqa: PLC0415 - a dev extra (scikit-learn): only the demo's photos

    photos = [Path(skimage.data.data_dir) / n for n in SKIMAGE_PHOTOS]
    photos += [Path(f) for f in sklearn.datasets.load_sample_images().filenames]  # china, flower
    missing = [str(p) for p in photos if not p.exists()]
    if missing:
        raise FileNotFoundError(f"bundled photos missing (is the [dev] extra installed?): {missing}")
    return photos


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="atoken-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="where everything is written")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir instead of starting it afresh")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra training overrides, e.g. steps=100 (see atoken-train --help)")
    args = p.parse_args(argv)
    run = args.run_dir
    if run.exists() and not args.resume:
        print(f"removing the previous demo run in {run} (to continue it instead: make demo ARGS=--resume, "
              "or python -m atoken.tools.demo --resume)")
        shutil.rmtree(run)

    photos, holdout = run / "photos", run / "holdout"
    for d in (photos, holdout):
        d.mkdir(parents=True, exist_ok=True)
    for src in bundled_photos():
        shutil.copy(src, (holdout if src.name == HELD_OUT else photos) / src.name)
    if not (run / "shards" / "index.json").exists():
        written, rejected = write_image_shards(photos, str(run / "shards"))
        print(f"shards: {written} training photos, {len(rejected)} rejected, 1 held out ({HELD_OUT})")

    train.main(["--config", "demo", "--set", f"run_dir={run}",
                "--set", f"data.streams.image_rec.remote={run / 'shards'}",
                "--set", f"log.eval_images={holdout}", *[a for o in args.overrides for a in ("--set", o)]])

    # After training: the model, to convert the run and reconstruct the held-out photo (--help answers at once).
    from atoken.model.inference_dir import read_inference_config  # noqa: PLC0415 - this CLI's thin entry: after parsing
    from atoken.model.tokenizer import Tokenizer  # noqa: PLC0415 - likewise
    from atoken.tools.file_reconstruction import reconstruct_files  # noqa: PLC0415 - likewise
    from atoken.training.inference_export import convert  # noqa: PLC0415 - likewise

    inference = convert(run, run / "inference")
    tok = Tokenizer.from_pretrained(inference, device="cpu")
    after = reconstruct_files(tok, [holdout / HELD_OUT], run / "reconstructions")[HELD_OUT]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval_psnr"' in line]
    before = evals[0]["eval_psnr_per_image"][HELD_OUT]
    step = read_inference_config(inference)[1]["source"]["step"]
    print(f"\nheld-out {HELD_OUT}: PSNR {before:.2f} dB at step 0 -> {after:.2f} dB after {step} steps")
    print(f"inference model: {inference}/  reconstruction: {run / 'reconstructions' / 'chelsea.png'}")


if __name__ == "__main__":
    main()
