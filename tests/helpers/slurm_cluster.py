"""A real single-node Slurm (Debian's slurm-wlm), started and stopped by the tests.

Everything lives in one temporary folder: slurm.conf (pointed to by ``SLURM_CONF``, nothing in /etc
is touched), state, spool, logs. Authentication is ``auth/none`` so no munge daemon is needed.
slurmctld and slurmd run as the current user (root in CI, where ``make test`` installs the package).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from atoken.training.distributed import free_port

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def missing() -> str | None:
    """Why Slurm cannot run here, or None."""
    for tool in DAEMONS + CLIENTS:
        if shutil.which(tool) is None:
            return f"{tool} not found (install Debian's slurm-wlm; `make test` does so when run as root)"
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root (SlurmUser=root)"
    return None


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 2
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = free_port(), free_port()
        self.conf.write_text(f"""\
ClusterName=atoken-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.root}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-i"], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost"], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out == "idle":
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"the test Slurm did not come up (node state {out!r}); logs:\n{logs}")

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, **kw)

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env or {}).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RunTime, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in re.findall(r"(\S+=\S*)", out))

    def wait(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY"), timeout: float = 600.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
