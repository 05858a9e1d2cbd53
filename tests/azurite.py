"""A real Azure blob service for tests: Azurite (the npm package that
./scripts/setup-env --tests installs into .tools/azurite), run as its own process on a free
port with its data in a temporary folder. stop() and start() again keep the port and
the folder, so blobs written before a stop are there after it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AZURITE_DIR = ROOT / ".tools" / "azurite" / "node_modules"
AZURITE_BIN = AZURITE_DIR / ".bin" / "azurite-blob"
AZURITE_CONSTANTS = AZURITE_DIR / "azurite" / "dist" / "src" / "common" / "utils" / "constants.js"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def emulator_account() -> tuple[str, str]:
    """(account name, base64 account key) as the installed Azurite defines them."""
    try:
        text = AZURITE_CONSTANTS.read_text()
    except FileNotFoundError:
        raise RuntimeError(f"{AZURITE_CONSTANTS} not found: run ./scripts/setup-env --tests to install Azurite") from None
    name = re.search(r'EMULATOR_ACCOUNT_NAME\s*=\s*"([^"]+)"', text)
    key = re.search(r'EMULATOR_ACCOUNT_KEY\s*=\s*Buffer\.from\(\s*"([A-Za-z0-9+/=]+)"\s*,\s*"base64"\s*\)', text)
    if not (name and key):
        raise RuntimeError(f"cannot find EMULATOR_ACCOUNT_NAME / EMULATOR_ACCOUNT_KEY in {AZURITE_CONSTANTS}")
    return name.group(1), key.group(1)


class Azurite:
    """``azurite-blob`` on 127.0.0.1:<port>, data under ``location``.

    start() waits until a real request succeeds; stop() ends only this process (its
    own process group: SIGTERM, then SIGKILL); start() after stop() reuses the port and
    the location. close() (or leaving a ``with`` block) also removes a location that
    this object created."""

    def __init__(self, location: Path | str | None = None, port: int | None = None):
        if not os.access(AZURITE_BIN, os.X_OK):
            raise RuntimeError(f"{AZURITE_BIN} not found: run ./scripts/setup-env --tests to install Azurite")
        self.account_name, self.account_key = emulator_account()
        self._own_location = location is None
        self.location = Path(location) if location is not None else Path(tempfile.mkdtemp(prefix="azurite-"))
        self.location.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else _free_port()
        self.log_path = self.location / "azurite.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
                f"AccountKey={self.account_key};BlobEndpoint={self.endpoint};")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def service_client(self, **kwargs):
        """A BlobServiceClient for this Azurite; kwargs go to from_connection_string
        (e.g. retry_total=0 for a client that must fail fast while Azurite is down)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string, **kwargs)

    def create_container(self, name: str):
        """Create container ``name`` (if it does not exist yet); returns its ContainerClient."""
        from azure.core.exceptions import ResourceExistsError

        container = self.service_client().get_container_client(name)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        return container

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                 "--location", str(self.location), "--silent", "--skipApiVersionCheck", "--loose",
                 "--disableTelemetry"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.location,
            )

    def _wait_ready(self, timeout: float) -> bool:
        """True once a real request works; False if the process exited first."""
        from azure.core.exceptions import AzureError

        client = self.service_client(retry_total=0, connection_timeout=2, read_timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _port_open(self.port):
                try:
                    client.get_service_properties()
                    return True
                except AzureError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Azurite did not answer on port {self.port} within {timeout:.0f} s; "
                           f"log {self.log_path}:\n{self._log_tail()}")

    def start(self) -> "Azurite":
        if self.running:
            return self
        # a port picked by _free_port() on the first start may be taken before Azurite
        # binds it: then pick another (never once data may refer to it, i.e. after a start)
        tries = 3 if not self._fixed_port else 1
        for attempt in range(tries):
            self._launch()
            if self._wait_ready(START_TIMEOUT_S):
                self._fixed_port = True
                return self
            if attempt + 1 < tries and "EADDRINUSE" in self._log_tail():
                self.port = _free_port()
                continue
            break
        raise RuntimeError(f"Azurite exited with code {self.proc.returncode} during start; "
                           f"log {self.log_path}:\n{self._log_tail()}")

    def stop(self) -> None:
        """End this Azurite (SIGTERM to its process group, SIGKILL after STOP_TIMEOUT_S)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)  # start_new_session: its pgid is its pid
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        proc.wait()

    def restart(self) -> "Azurite":
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_location:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> "Azurite":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
