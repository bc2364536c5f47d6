"""Where a stream's shards live: location, a start-up check of every remote, retried downloads.

- ``check_streams`` runs before any dataset is built: for an s3:// stream it asks the endpoint
  (boto3: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) for the
  bucket and the dataset's ``index.json``, so a missing bucket, wrong credentials or a wrong prefix
  fail at once with the stream, bucket and endpoint named (not later, deep in a DataLoader worker).
- ``RetryingStream`` downloads shards with exponential backoff (``RetryConfig``): a transient
  outage (connection refused, timeouts, 5xx) only delays the reader. The sample order does not
  depend on when a shard arrives, so nothing is lost or repeated.

NOTE: streaming 0.13 retries a download ``download_retry`` times with a fixed 1 s initial backoff,
and a download that still fails in its background thread ends the epoch's iteration early without
an error. We read samples by index (``dataset.py``), where a failure raises, and retry here.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from streaming import Stream

from atoken.model.errors import UserError

from .config import DataConfig, RetryConfig, StreamConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

INDEX = "index.json"
# S3 error codes that no retry will fix.
PERMANENT_CODES = {"400", "401", "403", "404", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                   "NoSuchBucket", "NoSuchKey", "NotFound", "InvalidBucketName"}
CREDENTIAL_CODES = {"401", "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def resolve_location(remote: str, local: str | None) -> tuple[str | None, str]:
    """(remote, local) for streaming: a local ``remote`` without cache dir is read in place; a URL
    without one is cached under $TMPDIR/atoken-mds/<hash of the URL>.

    NOTE: the default cache path is deterministic so that all local ranks of a node agree on it (as
    streaming requires) and a restarted job reuses the shards already downloaded.
    """
    if local is None:
        if "://" not in remote:
            return None, remote
        local = os.path.join(tempfile.gettempdir(), "atoken-mds", hashlib.sha1(remote.encode()).hexdigest()[:16])
    return remote, local


def endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (S3_ENDPOINT_URL unset)"


def is_permanent(e: BaseException) -> bool:
    """An S3 answer that no retry will change (missing object, denied access), or a local error."""
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code")) in PERMANENT_CODES
    return isinstance(e, (NoCredentialsError, FileNotFoundError, PermissionError, ValueError))


def with_retries(fn: Callable[[], T], retry: RetryConfig, what: str, on_failure: Callable[[], None] | None = None) -> T:
    """``fn()``, retried on transient errors after backoff * 2**k seconds (capped at backoff_max)."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except Exception as e:  # classified below; permanent ones re-raise at once
            if on_failure is not None:
                on_failure()
            if is_permanent(e) or attempt == retry.attempts:
                if attempt > 1:
                    raise RuntimeError(f"{what}: failed after {attempt} attempts: {type(e).__name__}: {e}") from e
                raise
            wait = min(retry.backoff * 2 ** (attempt - 1), retry.backoff_max)
            log.warning("%s: attempt %d/%d failed (%s: %s); retrying in %.1f s", what, attempt, retry.attempts,
                        type(e).__name__, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class RetryingStream(Stream):
    """A streaming ``Stream`` whose file downloads follow ``RetryConfig`` (see the module NOTE)."""

    def __init__(self, *, remote: str | None, local: str, retry: RetryConfig, stream_name: str):
        # download_retry=1: streaming's own retry loop makes a single attempt; ours wraps it.
        super().__init__(remote=remote, local=local, download_retry=1, download_timeout=retry.timeout)
        self.retry_config, self.stream_name = retry, stream_name

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        # Same paths as Stream._download_file (streaming 0.13), our retry policy around the download.
        remote = None if self.remote is None else os.path.join(self.remote, self.split, from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        with_retries(lambda: self._downloader.download(remote, local, self.download_timeout), self.retry_config,
                     f"stream {self.stream_name!r}: download of {remote}", on_failure=self._downloader.clean_up)
        return local


def s3_client(retry: RetryConfig):
    """A boto3 S3 client for the configured endpoint; its own retries off (``with_retries`` decides)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
        config=Config(connect_timeout=min(10.0, retry.timeout), read_timeout=retry.timeout,
                      retries={"max_attempts": 1, "mode": "standard"}))


def check_stream(stream: StreamConfig, retry: RetryConfig) -> None:
    """Raise a clear error unless ``stream.remote`` holds an MDS dataset we can read."""
    remote = stream.remote
    if "://" not in remote:
        if not os.path.isfile(os.path.join(remote, INDEX)):
            what = "no such folder" if not os.path.isdir(remote) else f"no {INDEX} there (not MDS shards)"
            raise UserError(f"stream {stream.name!r}: remote {remote!r}: {what}; write shards with "
                            "atoken-make-image-shards (or -video-, -3d-) and set data.streams.<name>.remote")
        return
    url = urllib.parse.urlparse(remote)
    if url.scheme != "s3":
        return  # other schemes: streaming's own downloaders report their errors
    bucket, key = url.netloc, "/".join(p for p in (url.path.strip("/"), INDEX) if p)
    where = f"stream {stream.name!r}: bucket {bucket!r} at endpoint {endpoint()}"
    client = s3_client(retry)
    for ask, missing in ((lambda: client.head_bucket(Bucket=bucket), "the bucket does not exist"),
                         (lambda: client.head_object(Bucket=bucket, Key=key),
                          f"no s3://{bucket}/{key}: {remote} is not an MDS dataset "
                          "(wrong prefix, or no shards written)")):
        try:
            with_retries(ask, retry, f"{where}: start-up check")
        except Exception as e:  # every failure becomes one clear message
            raise UserError(f"{where}: {_explain(e, missing)}") from e


def _explain(e: BaseException, missing: str) -> str:
    root = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e  # retries exhausted
    if isinstance(root, NoCredentialsError):
        return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if isinstance(root, ClientError):
        code = str(root.response.get("Error", {}).get("Code"))
        if code in CREDENTIAL_CODES:
            return (f"access denied ({code}): wrong credentials (AWS_ACCESS_KEY_ID="
                    f"{os.environ.get('AWS_ACCESS_KEY_ID', '<unset>')!r}) or no permission")
        if code in ("404", "NoSuchBucket", "NoSuchKey", "NotFound"):
            return missing
        return f"{code}: {root}"
    if isinstance(root, EndpointConnectionError):
        return f"the endpoint cannot be reached ({e})"
    return f"{type(e).__name__}: {e}"


def check_streams(cfg: DataConfig) -> None:
    """``check_stream`` for every stream: call at start, before building datasets."""
    cfg.check()
    for stream in cfg.streams.values():
        check_stream(stream, cfg.retry)
