"""How the SDK and the CLI reach a server: HTTPS with the server's own certificate
(``--tls-cert/--tls-key``, verified with ``--ca-cert``/``RAYBATCH_CA_CERT``), this
machine's token sent only to this machine's server, one warning for a token over plain
HTTP off loopback, and job ids that cannot change the URL they go into.

One real Ray node and one real server process serving HTTPS with a self-signed
certificate made here; a tiny HTTP listener stands for "another server" and records
what it was sent."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from raybatch import Client
from raybatch.client import RaybatchError
from raybatch.cluster import tls
from raybatch.config import API_PREFIX
from raybatch.server.main import tls_options
from tests.conftest import RAYBATCH, RayTestCluster, ServerProcess, free_port, run_cli, wait_for

pytestmark = pytest.mark.timeout(300)


class TlsServer(ServerProcess):
    """``python -m raybatch.server --tls-cert --tls-key`` on 127.0.0.1, checked healthy over HTTPS."""

    def __init__(self, cluster, state_dir: Path, cert: Path, key: Path):
        super().__init__(cluster, state_dir, ("--tls-cert", str(cert), "--tls-key", str(key)))
        self.cert = cert
        self.url = f"https://127.0.0.1:{self.port}"

    def start(self) -> "TlsServer":
        log = open(self.state_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raybatch.server", "--state-dir", str(self.state_dir),
             "--ray-address", self.cluster.address, "--dashboard-url", self.cluster.dashboard_url,
             "--port", str(self.port), "--tick", "0.5", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ))

        def healthy() -> bool:
            assert self.proc.poll() is None, (self.state_dir / "server.log").read_text()[-3000:]
            try:
                return httpx.get(self.url + API_PREFIX + "/health", timeout=2,
                                 verify=ssl.create_default_context(cafile=str(self.cert))).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the raybatch server (https)")
        return self


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cluster = RayTestCluster(nodes=1)
    state = tmp_path_factory.mktemp("tls-server")
    d = tmp_path_factory.mktemp("tls")
    cert, key = tls.pair(d / tls.CERT_NAME, d / tls.KEY_NAME)
    s = TlsServer(cluster, state, cert, key).start()
    yield s
    s.stop()
    cluster.shutdown()


class Recorder:
    """Another server: answers 401 to everything and records each request's path and
    Authorization header."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                seen.append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"detail": "missing or invalid token"}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAYBATCH_")}
    return subprocess.run([RAYBATCH, *args], capture_output=True, text=True, env={**base, **env}, timeout=60)


def test_the_cli_talks_https_to_a_server_it_can_verify_and_refuses_one_it_cannot(server, monkeypatch):
    # no CA: the self-signed certificate is refused, and the error says what to set
    p = run_cli(server, "list", "-o", "json")
    assert p.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in p.stderr and "RAYBATCH_CA_CERT" in p.stderr, p.stderr
    # the server's certificate as the CA: by option, then by environment (what `raybatch env` exports)
    p = run_cli(server, "--ca-cert", str(server.cert), "list", "-o", "json", check=True)
    assert json.loads(p.stdout) == [] and "plain HTTP" not in p.stderr
    monkeypatch.setenv("RAYBATCH_CA_CERT", str(server.cert))
    p = run_cli(server, "env", "-o", "json", check=True)
    exports = json.loads(p.stdout)["exports"]
    assert exports["RAYBATCH_ADDRESS"] == server.url
    assert exports["RAYBATCH_CA_CERT"] == str(server.cert.resolve())
    assert server.token not in p.stdout + p.stderr
    # on the server's own machine its state dir names its address and certificate: no option needed
    p = cli({"RAYBATCH_HOME": str(server.state_dir)}, "--address", server.url, "env", "-o", "json")
    assert p.returncode == 0, p.stderr
    exports = json.loads(p.stdout)["exports"]
    assert exports["RAYBATCH_CA_CERT"] == str(server.cert.resolve())
    assert exports["RAYBATCH_HOME"] == str(server.state_dir.resolve())
    # plain HTTP to the TLS port is no way around it
    with pytest.raises(RaybatchError):
        Client(server.url.replace("https://", "http://"), server.token).list()


def test_the_local_token_goes_only_to_the_local_server(server, recorder, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text("local-token-never-elsewhere\n")
    (home / "server.json").write_text(json.dumps({"url": server.url}))  # this state dir's server: the TLS one
    env = {"RAYBATCH_HOME": str(home), "RAYBATCH_CA_CERT": str(server.cert)}

    p = cli(env, "--address", recorder.url, "list")
    assert p.returncode == 1
    assert recorder.seen and all(auth is None for _, auth in recorder.seen), recorder.seen
    assert "needs a token: set RAYBATCH_TOKEN" in p.stderr, p.stderr
    assert "local-token-never-elsewhere" not in p.stdout + p.stderr
    # an explicit token does go where it is told (and is not the local one)
    recorder.seen.clear()
    p = cli({**env, "RAYBATCH_TOKEN": "given-for-this-server"}, "--address", recorder.url, "list")
    assert recorder.seen == [(f"{API_PREFIX}/jobs?limit=200", "Bearer given-for-this-server")]

    # the control: the same state dir's token does reach the server it belongs to
    (home / "token").write_text(server.token + "\n")
    p = cli(env, "--address", server.url, "list", "-o", "json")
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stderr
    # ... and so it would reach the listener, were the listener that state dir's server
    (home / "server.json").write_text(json.dumps({"url": recorder.url.replace("127.0.0.1", "localhost")}))
    recorder.seen.clear()
    cli(env, "--address", recorder.url, "list")
    assert recorder.seen and recorder.seen[0][1] == f"Bearer {server.token}"


def test_job_ids_that_are_not_ids_are_refused_before_any_request(server, recorder):
    c = Client(recorder.url, "tok")
    for bad in ("../cluster", "rb-1/cancel", "a..b", "rb-1?x=1", "", "rb 1", "rb-1#f"):
        for call in (c.get, c.cancel, c.logs, c.files, c.items, c.trials, c.metrics):
            with pytest.raises(RaybatchError, match="is not a job id"):
                call(bad)
        with pytest.raises(RaybatchError, match="is not a job id"):
            c.download(bad, "/nonexistent-dest")
    assert recorder.seen == []
    with pytest.raises(RaybatchError):  # a real id goes out (and the listener says 401)
        c.get("rb-1a2b3c4d.t3")
    assert recorder.seen[0][0] == f"{API_PREFIX}/jobs/rb-1a2b3c4d.t3"
    p = run_cli(server, "--ca-cert", str(server.cert), "show", "../cluster")
    assert p.returncode == 1 and "is not a job id" in p.stderr, p.stderr


def test_a_token_over_plain_http_off_loopback_warns_once(capsys):
    Client("http://192.0.2.7:8765", "tok", timeout=1)   # TEST-NET-1: no request is made
    Client("http://192.0.2.7:8765/", "tok", timeout=1)
    Client("http://127.0.0.1:9", "tok"), Client("http://[::1]:9", "tok"), Client("https://192.0.2.7:1", "tok")
    Client("http://192.0.2.8:8765", timeout=1)  # no token, nothing to warn about
    err = capsys.readouterr().err
    assert err.count("over plain HTTP") == 1 and "http://192.0.2.7:8765" in err, err
    assert len(err.strip().splitlines()) == 1


def test_server_tls_options_go_together(tmp_path):
    cert, key = tls.pair(tmp_path / "tls" / tls.CERT_NAME, tmp_path / "tls" / tls.KEY_NAME,
                         hosts=["head.example", "10.0.0.4"])
    assert tls_options(cert, key) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert tls_options(None, None) == {}
    with pytest.raises(SystemExit, match="go together"):
        tls_options(cert, None)
    with pytest.raises(SystemExit, match="no such file"):
        tls_options(cert, tmp_path / "nope.key")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    # kept once made: clients that trust it keep trusting it
    before = cert.read_bytes()
    assert tls.pair(cert, key) == (cert, key) and cert.read_bytes() == before


def test_the_heads_server_unit_serves_https_with_the_heads_certificate(tmp_path):
    """`raybatch cluster head-setup` (what the cluster YAML runs on the head) passes the
    certificate and key on to the server; `--print` makes nothing."""
    cert, key = tmp_path / "raybatch-tls" / "server.pem", tmp_path / "raybatch-tls" / "server.key"
    base = [RAYBATCH, "cluster", "head-setup", "--state-dir", "/mnt/raybatch-state",
            "--cluster-config", str(tmp_path / "ray_bootstrap_config.yaml"), "--print"]
    p = subprocess.run([*base, "--tls-cert", str(cert), "--tls-key", str(key)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    exec_start = next(line for line in p.stdout.splitlines() if line.startswith("ExecStart="))
    assert f"--tls-cert {cert} --tls-key {key}" in exec_start
    assert not (tmp_path / "raybatch-tls").exists()
    p = subprocess.run([*base, "--tls-cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--tls-cert and --tls-key go together" in p.stderr, p.stderr


def test_head_setup_makes_the_key_on_the_head_and_keeps_it(tmp_path):
    """What head-setup runs before installing the unit (systemd.ensure_tls): the certificate
    and key made where the head's YAML points (~/raybatch-tls), the directory 0700 and the
    key 0600, the head's own names in the certificate; kept on a re-run (clients keep
    trusting it), a key left readable by others made 0600 again."""
    import socket

    from cryptography import x509

    from raybatch.cluster import systemd

    d = tmp_path / "home" / "raybatch-tls"
    cert, key = systemd.ensure_tls(d / "server.pem", d / "server.key")
    assert oct(d.stat().st_mode & 0o777) == "0o700" and oct(key.stat().st_mode & 0o777) == "0o600"
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    names = {*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))}
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= names, names
    before = cert.read_bytes(), key.read_bytes()
    os.chmod(key, 0o644)
    assert systemd.ensure_tls(cert, key) == (cert, key) and (cert.read_bytes(), key.read_bytes()) == before
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    cert.unlink()  # half a pair: both made again
    systemd.ensure_tls(cert, key)
    assert cert.is_file() and key.read_bytes() != before[1]
