"""Process-group set-up from torchrun's or Slurm's environment (or none: one process)."""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Map srun's per-task variables onto torchrun's names (one task per GPU under srun)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    # Tasks on this node (streaming elects one leader per node by it). SLURM_TASKS_PER_NODE reads
    # like "8(x4),6": the first entry is this node's count on homogeneous allocations.
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
    os.environ["LOCAL_WORLD_SIZE"] = per_node.split(",")[0].split("(")[0]


def prepare_extension_build() -> None:
    """DeepSpeed JIT-builds a CPU shared-memory op on first init (``torch.utils.cpp_extension``, which
    runs the ``ninja`` found on PATH). Keep the build inside the venv, so it happens once per install,
    and always build it with the venv's own ninja.

    NOTE: the venv's ninja (pip, 1.13) and a system one (Debian, 1.11) hash build commands
    differently, so each sees the other's build as stale ("command line changed"): alternating an
    activated and a plain ``.venv/bin/python`` rebuilt the op every time (50-75 s).
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *path])


def init() -> DistInfo:
    """Initialise torch.distributed: NCCL on GPU, gloo on CPU. A plain ``python`` launch becomes a
    world of one, so the same DeepSpeed code path runs everywhere."""
    _env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    prepare_extension_build()
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
