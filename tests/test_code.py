"""The job's code on the nodes (raybatch.runtime.code): the node cache unpacks a package
once, safely and atomically, and keeps what recent jobs use."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from raybatch.runtime.code import package_code
from raybatch.runtime.code import KEEP_PACKAGES, KEEP_SECONDS, CodeCache, CodePackageError, unpack_package
from raybatch.runtime.rank import PYLIB, child_environment


def _code(tmp_path: Path) -> tuple[str, bytes]:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    return package_code(src)


def test_a_package_is_fetched_once_per_node_and_keeps_its_executable_bits(tmp_path):
    sha, data = _code(tmp_path)
    calls = []
    cache = CodeCache(tmp_path / "cache")
    assert cache.ensure(sha, None) is None  # not on the node: the driver must send it
    path = cache.ensure(sha, lambda: calls.append(1) or data)
    assert Path(path) == tmp_path / "cache" / "code" / sha and calls == [1]
    assert (Path(path) / "pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert os.access(Path(path) / "run.sh", os.X_OK)
    assert cache.ensure(sha, None) == path
    assert cache.ensure(sha, lambda: calls.append(1) or data) == path and calls == [1]


def test_concurrent_unpacks_of_one_package_leave_one_complete_copy(tmp_path):
    sha, data = _code(tmp_path)
    results, errors = [], []

    def go():
        try:
            results.append(CodeCache(tmp_path / "cache").ensure(sha, lambda: data))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(set(results)) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "code").iterdir()) == [sha]  # no .partial left
    assert (Path(results[0]) / "pkg" / "__init__.py").is_file()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in entries.items():
            zf.writestr(name, body)
    return buf.getvalue()


def test_unsafe_or_oversized_packages_are_refused_and_leave_nothing(tmp_path):
    with pytest.raises(CodePackageError, match="unsafe path in package: ../evil.py"):
        unpack_package(_zip({"ok.py": b"", "../evil.py": b"x"}), tmp_path / "a")
    with pytest.raises(CodePackageError, match="more than 0 MiB"):
        unpack_package(_zip({"big.bin": b"x" * 2048}), tmp_path / "b", limit=1024)
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "evil.py").exists()


def test_eviction_keeps_the_newest_and_the_recently_used(tmp_path):
    root = tmp_path / "cache" / "code"
    old = time.time() - KEEP_SECONDS - 60
    for i in range(KEEP_PACKAGES + 5):
        d = root / f"{i:064x}"
        d.mkdir(parents=True)
        # 0..4 are the oldest; 2 was used a minute ago
        t = old - (KEEP_PACKAGES + 5 - i) if i != 2 else time.time() - 60
        os.utime(d, (t, t))
    sha, data = _code(tmp_path)
    CodeCache(tmp_path / "cache").ensure(sha, lambda: data)
    left = {p.name for p in root.iterdir()}
    assert sha in left and f"{2:064x}" in left
    # the newest KEEP_PACKAGES stay (the new one, #2 and the 30 newest of the rest)
    assert len(left) == KEEP_PACKAGES
    assert f"{0:064x}" not in left and f"{KEEP_PACKAGES + 4:064x}" in left


def test_the_codes_pythonpath_comes_first_then_the_nodes(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/node/lib")
    env = child_environment({"PYTHONPATH": "/code:/user"})
    # ... and last, the directory of raybatch_metrics (importable in any Python the job uses)
    assert env["PYTHONPATH"] == f"/code:/user:/node/lib:{PYLIB}"
    monkeypatch.delenv("PYTHONPATH")
    assert child_environment({"PYTHONPATH": "/code"})["PYTHONPATH"] == f"/code:{PYLIB}"


def test_the_server_checks_and_keeps_the_zip_without_unpacking_it(tmp_path):
    from tests.test_storage_review import _app

    client = _app(tmp_path)
    sha, data = _code(tmp_path)
    assert client.get(f"/api/v1/code/{sha}").status_code == 404
    r = client.put(f"/api/v1/code/{sha}", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    assert (tmp_path / "code" / f"{sha}.zip").read_bytes() == data
    assert not (tmp_path / "code" / sha).exists()
    assert client.get(f"/api/v1/code/{sha}").status_code == 200
    evil = _zip({"../evil.py": b"x"})
    evil_sha = hashlib.sha256(evil).hexdigest()
    r = client.put(f"/api/v1/code/{evil_sha}", content=evil, headers={"Content-Type": "application/zip"})
    assert r.status_code == 400 and "unsafe path in package: ../evil.py" in r.text
    assert not (tmp_path / "code" / f"{evil_sha}.zip").exists()
