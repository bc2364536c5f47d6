"""Files by location, local path or s3:// URL: list, read as a stream, read with seeks, write, remove.

What the shard writers' inputs and parts need (``tools/sources.py``, ``tools/parts.py``); the
training streams' shards go through ``storage.py`` and streaming's own downloaders instead. S3 is
boto3 with the same environment as everywhere else: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.

NOTE: a module of its own, not part of ``storage.py``: that one imports streaming (seconds), and the
writers' CLIs answer --help without it.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import BinaryIO


def is_remote(url: str) -> bool:
    return "://" in str(url)


def join(url: str, *names: str) -> str:
    """``url`` with ``names`` appended, '/'-separated for URLs."""
    if is_remote(url):
        return "/".join([str(url).rstrip("/"), *names])
    return os.path.join(url, *names)


def _split(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3":
        raise ValueError(f"{url}: only local paths and s3:// URLs are supported")
    return parsed.netloc, parsed.path.lstrip("/")


def _client():
    # One client per endpoint and key: the environment may change between calls (tests, several stores).
    return _client_for(os.environ.get("S3_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"))


@functools.cache
def _client_for(endpoint: str | None, key_id: str | None):
    import boto3  # noqa: PLC0415 - local runs and --help do not need it

    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def list_files(prefix: str) -> list[str]:
    """Every file under a folder or s3:// prefix (recursive), as full paths or URLs, sorted."""
    if not is_remote(prefix):
        root = Path(prefix)
        if not root.is_dir():
            raise FileNotFoundError(f"input folder {str(prefix)!r} does not exist or is not a folder")
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    bucket, key = _split(prefix)
    key = key.rstrip("/") + "/" if key else ""
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return sorted(f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", []))


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(url)
    from botocore.exceptions import ClientError  # noqa: PLC0415 - with boto3, only for s3:// paths

    bucket, key = _split(url)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def open_stream(url: str) -> BinaryIO:
    """A file opened for reading front to back (an S3 object's body is streamed, not downloaded first)."""
    if not is_remote(url):
        return open(url, "rb")
    bucket, key = _split(url)
    return _client().get_object(Bucket=bucket, Key=key)["Body"]


def open_seekable(url: str) -> BinaryIO:
    """A file opened for random access (Parquet reads its footer first); S3 by ranged GETs."""
    if not is_remote(url):
        return open(url, "rb")
    return io.BufferedReader(_S3Range(url), buffer_size=1 << 20)


class _S3Range(io.RawIOBase):
    """An S3 object as a seekable raw file: each read is one ranged GET."""

    def __init__(self, url: str):
        self.bucket, self.key = _split(url)
        self.size = _client().head_object(Bucket=self.bucket, Key=self.key)["ContentLength"]
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        body = _client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{self.pos + n - 1}")
        data = body["Body"].read()
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file; a local one appears complete or not at all (temporary file, then rename)."""
    if is_remote(url):
        bucket, key = _split(url)
        _client().put_object(Bucket=bucket, Key=key, Body=data)  # an S3 PUT is atomic
        return
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(url)), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, url)


def remove_tree(url: str) -> None:
    """Remove a folder or every object under an s3:// prefix (nothing if absent)."""
    if not is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    bucket = _split(url)[0]
    keys = [u[len(f"s3://{bucket}/"):] for u in list_files(url)]
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        _client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
