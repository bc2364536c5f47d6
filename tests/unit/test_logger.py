"""What a run reports: the wandb image grid holds the photos, resumed runs log each step once."""
import json

import numpy as np
import skimage.data
import torch
import wandb
from PIL import Image

from atoken.training.logger import _drop_after, grid_pixels


def test_wandb_grid_shows_the_images():
    """wandb.Image writes the grid's PNG: its tiles are the originals and reconstructions, 8-bit
    (a float grid in [0, 1] came out all black)."""
    photos = [skimage.data.astronaut(), skimage.data.coffee()]
    originals = [torch.from_numpy(np.asarray(Image.fromarray(p).resize((128, 128)))).permute(2, 0, 1).float() / 255
                 for p in photos]
    recons = [1 - x for x in originals]  # stand-ins that differ from the originals
    png = np.asarray(Image.open(wandb.Image(grid_pixels(originals, recons))._path).convert("RGB"))
    assert png.shape == (2 * 130 + 2, 2 * 130 + 2, 3)  # 128 px tiles, 2 px padding
    for row, images in enumerate((originals, recons)):
        for col, x in enumerate(images):
            tile = png[2 + row * 130:130 + row * 130, 2 + col * 130:130 + col * 130]
            want = (x * 255).round().byte().permute(1, 2, 0).numpy()
            assert np.abs(tile.astype(int) - want).max() <= 1, (row, col)


def test_resume_drops_the_records_of_steps_lost_with_the_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "eval_psnr": 10.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _drop_after(path, 5)  # the checkpoint of step 5 is resumed: steps 6 and 7 run again
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
