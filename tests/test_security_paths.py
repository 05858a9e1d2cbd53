"""Security review (issue 18, part 1): paths, files, size limits and permissions, through
a real server process on a real Ray cluster, and the real CLI.

- a job's symbolic links (to ``/``, to the server's ``raybatch.db``) are listed as links,
  never followed by ``files`` / ``files/content`` / ``download``; ``..``, absolute paths
  and NUL bytes in ``?path`` are 400s;
- ``code_package`` is only ever a sha256 (API, code store, a node's cache), and a package
  cannot hold links, ``..``/absolute names or more than MAX_ZIP_ENTRIES entries;
- request bodies have limits (413 naming the limit, before the body is read);
- names listed by storage or a server are refused when they would be written outside the
  destination (``raybatch download``, input staging, checkpoint restores);
- the server's state is its user's alone (umask 077), and the nodes' scratch directories
  are private per-user 0700 directories that refuse one planted by someone else.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from raybatch.config import API_PREFIX
from raybatch.server.limits import MAX_BATCH_BODY, MAX_JOB_BODY
from tests.conftest import RayTestCluster, ServerProcess, run_cli, stop_everything

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = RayTestCluster(nodes=1, cpus=2)
    state = tmp_path_factory.mktemp("server")
    server = ServerProcess(cluster, state).start()
    client = server.client()
    http = httpx.Client(base_url=server.url + API_PREFIX, headers={"Authorization": f"Bearer {server.token}"},
                        timeout=30)
    yield {"server": server, "client": client, "http": http, "state": state}
    http.close()
    client.close()
    try:
        stop_everything(server)
    finally:
        server.stop()
        cluster.shutdown()


@pytest.fixture(scope="module")
def linked_job(env):
    """A finished job that planted links in its tree: in an output (to ``/``, to the
    server's database and token) and in place of its whole checkpoints directory."""
    state = env["state"]
    cmd = (f'set -e; out="$RAYBATCH_OUTPUT_OUT"; echo fine > "$out/ok.txt"; ln -s / "$out/root"; '
           f'ln -s {state}/raybatch.db "$out/db"; mkdir "$out/sub"; ln -s {state}/token "$out/sub/token"; '
           f'rm -rf "$RAYBATCH_CHECKPOINT_DIR"; ln -s / "$RAYBATCH_CHECKPOINT_DIR"; '
           f'echo "$RAYBATCH_JOB_TEMP"')
    sub = env["client"].submit({"name": "links", "experiment": "security", "resources": {"cpus": 1},
                                "command": cmd, "outputs": {"out": {}}, "max_wall_clock": "2m"})
    done = env["client"].wait(sub.id, timeout=90)
    assert done.state == "SUCCEEDED", (done.reason, env["client"].logs(sub.id, stream="stderr"))
    return done


# ---- 1. links in a job's tree ------------------------------------------------------------
def test_links_in_a_jobs_tree_are_listed_as_links_and_never_followed(env, linked_job):
    http, job = env["http"], linked_job.id
    listing = {f["path"]: f for f in http.get(f"/jobs/{job}/files").json()}
    assert listing["outputs/out/ok.txt"]["type"] == "file" and listing["outputs/out/ok.txt"]["size"] == 5
    for link in ("outputs/out/root", "outputs/out/db", "outputs/out/sub/token", "checkpoints"):
        assert listing[link]["type"] == "link" and listing[link]["size"] == 0, listing.get(link)
    # nothing of the machine came through a link: no /etc, no file of the server's state
    assert not [p for p in listing if "/etc/" in p or p.startswith(("outputs/out/root/", "checkpoints/"))]
    # listing below a link, or a replaced directory of the tree, lists nothing
    for below in ("outputs/out/root/etc", "checkpoints", "checkpoints/etc"):
        r = http.get(f"/jobs/{job}/files", params={"path": below})
        assert r.status_code in (200, 403), r.text
        assert not [f for f in (r.json() if r.status_code == 200 else []) if f["type"] == "file"], r.text
    # no content through a link, wherever it is
    for path in ("outputs/out/db", "outputs/out/sub/token", "outputs/out/root/etc/passwd", "checkpoints/etc/passwd"):
        r = http.get(f"/jobs/{job}/files/content", params={"path": path})
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
        assert "link" in r.json()["detail"], r.text
    assert http.get(f"/jobs/{job}/files/content", params={"path": "outputs/out/ok.txt"}).content == b"fine\n"


def test_cli_download_skips_links_and_lists_them_in_json(env, linked_job, tmp_path):
    server = env["server"]
    rows = json.loads(run_cli(server, "files", linked_job.id, "--path", "outputs/out", "-o", "json", check=True).stdout)
    assert {r["path"]: r["type"] for r in rows} == {
        "outputs/out/ok.txt": "file", "outputs/out/root": "link", "outputs/out/db": "link",
        "outputs/out/sub/token": "link"}
    run_cli(server, "download", linked_job.id, str(tmp_path / "dl"), "--path", "outputs/out", check=True)
    got = sorted(p.relative_to(tmp_path / "dl").as_posix() for p in (tmp_path / "dl").rglob("*"))
    assert got == ["ok.txt"], got


@pytest.mark.parametrize("path, words", [
    ("../../etc", "'..' is not allowed"), ("outputs/../../../etc/passwd", "'..' is not allowed"),
    ("/etc/passwd", "an absolute path"), ("stdouterr/\0x", "NUL"),
])
def test_bad_tree_paths_are_400_with_a_message(env, linked_job, path, words):
    for route in ("files", "files/content"):
        r = env["http"].get(f"/jobs/{linked_job.id}/{route}", params={"path": path})
        assert r.status_code == 400, (route, path, r.status_code, r.text[:300])
        assert words in r.json()["detail"], r.text


# ---- 2. code_package is a sha256 ----------------------------------------------------------
def test_code_package_must_be_a_sha256(env):
    http = env["http"]
    (env["state"] / "code" / "not-a-sha").mkdir(parents=True, exist_ok=True)  # a directory that exists
    for bad in ("../../", "/etc", "not-a-sha", "A" * 64, "0" * 63):
        r = http.post("/jobs", json={"spec": {"name": "x", "command": "true"}, "code_package": bad})
        assert r.status_code == 422, (bad, r.status_code, r.text[:300])
        assert "code_package" in r.text
    assert http.get("/code/not-a-sha").status_code == 400
    assert "not a sha256" in http.get("/code/not-a-sha").json()["detail"]
    assert http.get("/inputs/..").status_code in (400, 404)  # never a path


def test_code_cache_refuses_a_path_for_a_sha(tmp_path):
    from raybatch.runtime.code import CodeCache, CodePackageError

    cache = CodeCache(tmp_path / "cache")
    with pytest.raises(CodePackageError, match="not a sha256"):
        cache.ensure("../../outside", lambda: _zip({"a.py": b"x"}))
    assert not (tmp_path / "outside").exists()


def _zip(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def _put(http, data: bytes):
    import hashlib

    return http.put(f"/code/{hashlib.sha256(data).hexdigest()}", content=data)


def test_packages_with_links_or_escaping_names_are_refused(env):
    http = env["http"]
    for data, words in [(_zip({"a.py": b"x"}, links={"evil": "/etc"}), "symbolic link"),
                        (_zip({"/abs.py": b"x"}), "absolute"),
                        (_zip({"a/../../up.py": b"x"}), "'..'")]:
        r = _put(http, data)
        assert r.status_code == 400 and words in r.json()["detail"], r.text


def test_zip_entry_count_is_capped(env):
    from raybatch.runtime.code import MAX_ZIP_ENTRIES

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(MAX_ZIP_ENTRIES + 1):
            zf.writestr(zipfile.ZipInfo(f"{i}"), b"")
    r = _put(env["http"], buf.getvalue())
    assert r.status_code == 413, r.text[:300]
    assert f"more than the limit of {MAX_ZIP_ENTRIES}" in r.json()["detail"]


# ---- 3. request size limits ----------------------------------------------------------------
def _raw(server, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes (headers that promise a body never sent); the status and body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_job_bodies_over_their_limits_are_413_before_being_read(env):
    server = env["server"]
    for path, limit in (("/jobs", MAX_JOB_BODY), ("/jobs/batch", MAX_BATCH_BODY)):
        code, body = _raw(server, (f"POST {API_PREFIX}{path} HTTP/1.1\r\nHost: x\r\n"
                                   f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
                                   f"Content-Length: {limit + 1}\r\n\r\n").encode())
        assert code == 413, body
        assert f"{limit // 2**20} MiB" in json.loads(body)["detail"]


def test_a_chunked_job_body_is_cut_at_the_limit(env):
    def chunks():
        yield b'{"spec": {"name": "x", "command": "'
        for _ in range(MAX_JOB_BODY // 2**16 + 2):
            yield b"a" * 2**16
        yield b'"}}'

    r = env["http"].post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert "4 MiB" in r.json()["detail"]
    # a body under the limit still works
    ok = env["http"].post("/jobs", json={"spec": {"name": "small", "command": "true", "resources": {"cpus": 1}}})
    assert ok.status_code == 201, ok.text


def test_code_upload_over_its_limit_is_refused_before_the_body(env):
    from raybatch.runtime.code import MAX_CODE_BYTES

    server = env["server"]
    code, body = _raw(server, (f"PUT {API_PREFIX}/code/{'0' * 64} HTTP/1.1\r\nHost: x\r\n"
                               f"Authorization: Bearer {server.token}\r\n"
                               f"Content-Length: {MAX_CODE_BYTES + 1}\r\n\r\n").encode())
    assert code == 413 and b"500 MiB" in body, body


# ---- 4. listed names never land outside the destination -----------------------------------
class _Hostile(BaseHTTPRequestHandler):
    """A server whose listing names files outside the download's destination."""

    names = ["ok.txt", "../escaped.txt"]

    def do_GET(self):  # noqa: N802
        if "/files/content" in self.path:
            body = b"pwned"
        elif self.path.split("?")[0].endswith("/files"):
            body = json.dumps([{"path": n, "size": 5, "modified": 0, "location": n, "type": "file"}
                               for n in self.names]).encode()
        else:
            body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name", ["../escaped.txt", "ABSOLUTE", "a//b.txt"])
def test_cli_download_refuses_names_that_leave_the_destination(tmp_path, name):
    if name == "ABSOLUTE":
        name = str(tmp_path / "escaped-abs.txt")
    handler = type("H", (_Hostile,), {"names": ["ok.txt", name]})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        fake = type("S", (), {"url": f"http://127.0.0.1:{httpd.server_port}", "token": "t" * 32})
        dest = tmp_path / "deep" / "dl"
        p = run_cli(fake, "download", "rb-x", str(dest), timeout=60)
    finally:
        httpd.shutdown()
    assert p.returncode != 0, p.stdout + p.stderr
    assert repr(name) in (p.stdout + p.stderr).replace("\n", ""), p.stdout + p.stderr
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped-abs.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # refused before anything was written


def test_staging_and_restores_refuse_blob_names_that_leave_the_destination(tmp_path):
    """Blob storage accepts any name; a node writes them below its cache or mirror."""
    from raybatch.storage.backends import Backend, Entry, StorageError
    from raybatch.storage.datastores import Access
    from raybatch.storage.staging import InputCache, download_tree

    class Listed(Backend):
        def __init__(self, names):
            self.access = Access("blob", "p", container="c", account="a", uri="az://c/p")
            self.names = names

        def list(self, rel=""):
            return [Entry(n, 3, 1.0, etag="e") for n in self.names]

        def download(self, rel, dest, progress=None):
            Path(dest).write_bytes(b"bad")

    for name in ("../../escaped.txt", "/abs.txt", "a//b.txt", "x/\0y"):
        with pytest.raises(StorageError, match="refused") as e:
            download_tree(Listed(["ok.txt", name]), tmp_path / "restore")
        assert repr(name) in str(e.value) and "az://c/p/" in str(e.value)
        with pytest.raises(StorageError, match="refused"):
            InputCache(tmp_path / "cache").stage(Listed(["ok.txt", name]))
    assert not (tmp_path / "escaped.txt").exists() and not list((tmp_path / "restore").rglob("*.txt"))


# ---- 5. permissions ------------------------------------------------------------------------
def test_server_state_is_private(env, linked_job):
    state = env["state"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (state / "raybatch.db-wal").exists()  # the server holds the store open in WAL mode
    for name in ("raybatch.db", "raybatch.db-wal", "token"):
        assert stat.S_IMODE((state / name).stat().st_mode) & 0o077 == 0, name
    r = _put(env["http"], _zip({"main.py": b"print(1)"}))
    assert r.status_code == 201, r.text
    assert stat.S_IMODE((state / "code").stat().st_mode) == 0o700
    for p in (state / "code").glob("*.zip"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_a_jobs_scratch_is_in_a_private_per_user_directory(env, linked_job):
    temp = Path(env["client"].logs(linked_job.id).strip().splitlines()[-1])
    root = Path(temp).parents[2]
    assert root.name == f"raybatch-{os.getuid()}" and temp.parent.parent.name == "jobs", temp
    for d in (root, root / "jobs", root / "mirror"):
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), d


def test_a_planted_scratch_directory_is_refused(tmp_path, monkeypatch):
    """Someone else created <tmp>/raybatch-<uid>/jobs first (or made it writable): the
    attempt fails with the reason, nothing is written there."""
    import tempfile

    from raybatch import private_dir
    from raybatch.runtime.launch import check_private_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert check_private_dirs() is None
    root = private_dir.root_path()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    os.chmod(root / "jobs", 0o777)
    assert "group or others may write it" in check_private_dirs()
    os.rmdir(root / "jobs")
    os.symlink(tmp_path, root / "jobs")
    assert "symbolic link" in check_private_dirs()
    os.unlink(root / "jobs")
    if os.getuid() == 0:  # only root can give a directory to another user
        os.chown(root, 65534, 65534)
        assert "belongs to uid 65534" in check_private_dirs()
        os.chown(root, 0, 0)
    os.chmod(root, 0o755)  # ours, only readable by others (a plain mkdir -p made it): tightened
    assert check_private_dirs() is None and stat.S_IMODE(root.stat().st_mode) == 0o700


def test_the_driver_and_launcher_refuse_a_code_package_that_is_not_a_sha(tmp_path):
    """A row from before the API checked it, or an edited attempt file: never a path."""
    from raybatch.runtime.code import CodePackageError, package_zip
    from raybatch.runtime.driver import check_code_ref
    from raybatch.runtime.protocol import CodeRef

    sha = "a" * 64
    check_code_ref(CodeRef(sha=sha, dir=f"/s/code/{sha}", zip=f"/s/code/{sha}.zip"))  # fine
    for bad in (CodeRef(sha="../../etc", dir="/etc", zip="/s/code/x.zip"),
                CodeRef(sha=sha, dir="/home/someone", zip=f"/s/code/{sha}.zip")):
        with pytest.raises(SystemExit, match="refusing to ship it"):
            check_code_ref(bad)
    with pytest.raises(CodePackageError, match="not a sha256"):
        package_zip(tmp_path, "../../etc/passwd")


def test_older_state_is_tightened_and_the_local_default_starts_private(tmp_path):
    from raybatch.local.embedded import LocalCluster
    from raybatch.private_dir import tighten_state_dir

    state = tmp_path / "state"
    (state / "code").mkdir(parents=True)
    for name in ("raybatch.db", "raybatch.db-wal", "token", "code/" + "b" * 64 + ".zip"):
        (state / name).write_text("x")
        (state / name).chmod(0o644)
    state.chmod(0o755)
    (state / "code").chmod(0o755)
    tighten_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 == stat.S_IMODE((state / "code").stat().st_mode)
    for name in ("raybatch.db", "raybatch.db-wal", "token", "code/" + "b" * 64 + ".zip"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    # every part of the local default (Ray, the server, the supervisor) starts with umask 077
    LocalCluster(tmp_path / "home").popen(["sh", "-c", "umask"], "umask.log", dict(os.environ)).wait(timeout=10)
    assert (tmp_path / "home" / "logs" / "umask.log").read_text().strip() == "0077"


def test_logs_never_come_through_a_replaced_log_directory(env, linked_job):
    """A job that replaces its own stdouterr directory with a link to another job's (or to
    anything of the machine) gets its log read refused, not the other job's lines: the logs,
    items, trials and metrics routes read through the same link-checking backend as files."""
    http, client = env["http"], env["client"]
    other = client.submit({"name": "other", "experiment": "security", "resources": {"cpus": 1},
                           "command": "echo the-other-jobs-line", "max_wall_clock": "2m"})
    assert client.wait(other.id, timeout=90).state == "SUCCEEDED"
    assert "the-other-jobs-line" in client.logs(other.id)
    mine = Path(linked_job.job_dir) / "stdouterr"
    assert mine.is_dir() and not mine.is_symlink()
    moved = mine.with_name("stdouterr.real")
    mine.rename(moved)
    try:
        mine.symlink_to(Path(client.get(other.id).job_dir) / "stdouterr")
        r = http.get(f"/jobs/{linked_job.id}/logs", params={"rank": 0, "stream": "stdout"})
        assert r.status_code == 403 and "link" in r.json()["detail"], (r.status_code, r.text[:300])
        assert "the-other-jobs-line" not in r.text
    finally:
        mine.unlink()
        moved.rename(mine)
    r = http.get(f"/jobs/{linked_job.id}/logs", params={"rank": 0, "stream": "stdout"})
    assert r.status_code == 200, r.text


def _lying_zip(entries: int, zip64: bool) -> bytes:
    """A zip of ``entries`` empty files whose end record (and zip64 end record, with
    ``zip64``) says it holds 1: ``ZipFile`` ignores that count and reads every header."""
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(entries):
            zf.writestr(zipfile.ZipInfo(f"{i}"), b"")
    data = buf.getvalue()
    end = len(data) - zipfile.sizeEndCentDir  # no archive comment
    sig, _, _, count, total, size, offset, _ = struct.unpack(zipfile.structEndArchive, data[end:])
    assert sig == zipfile.stringEndArchive and count == total == entries
    head = data[:end]
    if zip64:  # the zip64 records (as for > 65535 entries), with the classic fields at their 0xFFFF.. markers
        at = len(head)
        head += struct.pack(zipfile.structEndArchive64, zipfile.stringEndArchive64, 44, 45, 45, 0, 0,
                            1, 1, size, offset)
        head += struct.pack(zipfile.structEndArchive64Locator, zipfile.stringEndArchive64Locator, 0, at, 1)
        return head + struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0,
                                  0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return head + struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, 1, 1, size, offset, 0)


@pytest.mark.parametrize("zip64", [False, True], ids=["end-record", "zip64-end-record"])
def test_a_zip_whose_end_record_lies_about_its_entry_count_is_refused(zip64, tmp_path):
    """The entry cap counts the central directory's headers, not the end record's claim:
    ``ZipFile`` reads headers for the directory's whole byte size, so a zip saying 1 entry
    could front a million (measured before the fix: 300k = 1.9 s and 118 MiB in
    ``ZipFile`` alone). Unit level, with a small ``max_entries``."""
    from raybatch.runtime.code import CodePackageTooLarge, open_package

    data = _lying_zip(50, zip64)
    assert zipfile._EndRecData(io.BytesIO(data))[zipfile._ECD_ENTRIES_TOTAL] == 1  # the lie, as zipfile reads it
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == 50                 # and what ZipFile would load
    path = tmp_path / "lying.zip"
    path.write_bytes(data)
    for source in (io.BytesIO(data), path, str(path)):
        with pytest.raises(CodePackageTooLarge, match="at least 11 entries, more than the limit of 10"):
            open_package(source, max_entries=10)
    with open_package(io.BytesIO(data), max_entries=50) as zf:  # at the limit: opened, all entries there
        assert len(zf.infolist()) == 50
    prefixed = b"#!/bin/sh\n" * 7 + data  # data before the zip (a self-extractor): the walk starts where ZipFile does
    with pytest.raises(CodePackageTooLarge):
        open_package(io.BytesIO(prefixed), max_entries=49)
    with open_package(io.BytesIO(prefixed), max_entries=50) as zf:
        assert len(zf.infolist()) == 50
    with pytest.raises(zipfile.BadZipFile):  # a broken directory is refused as no zip, not walked past
        open_package(io.BytesIO(data.replace(b"PK\x01\x02", b"PK\x01\x03", 1)), max_entries=10)
