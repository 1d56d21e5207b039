"""An S3 API on 127.0.0.1 for tests and benchmarks: moto's server in a child process.

Sieve names no storage provider: s3fs (through fsspec) finds the endpoint and credentials in
the usual AWS variables, so pointing those at this server is all it takes to run every stage
"on S3". The server only ever binds to loopback. moto and s3fs come with the dev extra.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator

#: the variables botocore (and so s3fs) reads; a fake key is all moto needs
_ENV = {
    "AWS_ACCESS_KEY_ID": "sieve-test",
    "AWS_SECRET_ACCESS_KEY": "sieve-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class LoopbackS3:
    """A running server: its endpoint and the variables that point s3fs at it."""

    endpoint: str
    env: dict[str, str]

    def make_bucket(self, name: str) -> str:
        """Create a bucket; returns its URL prefix (`s3://name`)."""
        fs = self.filesystem()
        fs.mkdir(name)
        return f"s3://{name}"

    def filesystem(self):  # -> s3fs.S3FileSystem
        """A fresh s3fs filesystem on this server (no instance cache, so no stale listings)."""
        import s3fs  # noqa: PLC0415 - optional (dev extra): only tests and benchmarks use it

        return s3fs.S3FileSystem(
            key=self.env["AWS_ACCESS_KEY_ID"],
            secret=self.env["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": self.endpoint},
            skip_instance_cache=True,
        )


def available() -> str | None:
    """None when moto's server and s3fs can be imported, else the reason they cannot."""
    try:
        import moto.server  # noqa: F401, PLC0415 - a probe of optional packages
        import s3fs  # noqa: F401, PLC0415 - a probe of optional packages
    except ImportError as exc:
        return f"moto[server] and s3fs are needed for the S3 tests ({exc})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_s3(set_env: bool = True, timeout: float = 30.0) -> Iterator[LoopbackS3]:
    """Start moto's S3 server on 127.0.0.1; with `set_env`, point this process (and the Dask
    workers and children it starts) at it through the AWS variables, restored afterwards."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
                time.sleep(0.1)
        if set_env:
            os.environ.update(env)
        yield LoopbackS3(endpoint, env)
    finally:
        if set_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
