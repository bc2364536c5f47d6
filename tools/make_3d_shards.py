"""Turn a folder of meshes into MDS shards of 3D assets for training.

    python -m atoken.tools.make_3d_shards MESHES/ OUT --views 8 --resolution 256   # OUT: folder or s3://

Every mesh file under the folder (OBJ with its MTL and textures, PLY, GLB, glTF; recursively, in
sorted order of its relative path) is loaded, normalised into [-0.5, 0.5]^3, rendered from
``--views`` cameras on a sphere at ``--resolution`` px (Mitsuba, CPU; ``data_pipeline.render``) and
voxelised into 64^3 surface voxels. Files that cannot be read, meshes without faces and assets whose
render is empty are listed with the reason and left out. Captions: an optional sidecar text file
beside each mesh, its name with ``.txt`` for the extension (``chair.glb`` -> ``chair.txt``); none
gives "". Columns: ``data_pipeline.assets.ASSET_COLUMNS``. An s3:// output is uploaded by
MDSWriter itself (boto3: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .shard_writer import add_common_args, reason, resolve_inputs, run_cli, sidecar_caption, write_shards


def check_asset(path: Path, *, views: int, resolution: int, spp: int) -> tuple[dict[str, Any] | None, str]:
    """The sample of a mesh that loads, renders and voxelises, else (None, reason)."""
    from atoken.data_pipeline.assets import prepare_asset  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    try:
        return {**prepare_asset(path, views=views, resolution=resolution, spp=spp),
                "caption": sidecar_caption(path)}, ""
    except Exception as e:  # noqa: BLE001 - any failure rejects the file
        return None, reason(e)


def write_3d_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                    views: int = 8, resolution: int = 256, spp: int = 16, root: str | os.PathLike | None = None,
                    size_limit: int | str = "64mb", overwrite: bool = False, workers: int = 1,
                    progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the meshes to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively) or a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder). ``views`` cameras at ``resolution``
    px (at least one 16 px patch), ``spp`` samples per pixel.
    """
    if views < 1 or resolution < 16 or spp < 1:
        raise ValueError(f"need views >= 1, resolution >= 16 (one patch) and spp >= 1, "
                         f"got {views}, {resolution}, {spp}")
    from atoken.data_pipeline.assets import ASSET_COLUMNS, ASSET_EXTENSIONS  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    paths, names = resolve_inputs(paths_or_dir, ASSET_EXTENSIONS, root)
    check = functools.partial(check_asset, views=views, resolution=resolution, spp=spp)
    return write_shards(paths, names, out, ASSET_COLUMNS, check, desc="assets", size_limit=size_limit,
                        overwrite=overwrite, workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atoken-make-3d-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder of meshes, searched recursively")
    add_common_args(ap)
    ap.add_argument("--views", type=int, default=8, help="rendered views per asset (default 8)")
    ap.add_argument("--resolution", type=int, default=256, help="view size in px, at least 16 (default 256)")
    ap.add_argument("--spp", type=int, default=16, help="samples per pixel, for antialiasing (default 16)")
    args = ap.parse_args(argv)
    return run_cli(functools.partial(write_3d_shards, args.input, args.out, views=args.views,
                                     resolution=args.resolution, spp=args.spp, size_limit=args.size_limit,
                                     overwrite=args.overwrite, workers=args.workers,
                                     progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
