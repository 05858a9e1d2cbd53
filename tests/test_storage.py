"""Storage layer unit tests, without Ray: location strings, the datastores file and
credential references, the local and Azure Blob backends (against a real Azurite),
the node input cache, output/checkpoint/log sync, and the job file tree (plan)."""

from __future__ import annotations

import hashlib
import os
import stat
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from raybatch.spec.job import JobSpec
from raybatch.spec.loader import SpecError
from raybatch.storage import backends, sync
from raybatch.storage.backends import Backend, StorageError, open_backend
from raybatch.storage.datastores import (
    Access, CredentialError, Datastores, DatastoresFile, DatastoresFileWatcher,
)
from raybatch.spec.location import Location, LocationError, parse
from raybatch.storage.plan import check_locations, job_dir_for, job_locations, locate
from raybatch.storage.staging import InputCache, download_tree
from raybatch.storage.sync import DirSync, LogSync, NodeSync, SyncReport
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(120)

MiB = 2**20


# ---- location.parse ------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("/data/x", Location("local", "/data/x")),
    ("  /data/x  ", Location("local", "/data/x")),
    ("~/ds", Location("local", str(Path.home() / "ds"))),
    ("file:///data/x/y", Location("local", "/data/x/y")),
    ("file://localhost/data/x", Location("local", "/data/x")),
    ("az://cont/a/b", Location("blob", "a/b", container="cont")),
    ("az://cont", Location("blob", "", container="cont")),
    ("az://cont/a/./b//c/", Location("blob", "a/b/c", container="cont")),
    ("az://cont@acct1/a", Location("blob", "a", container="cont", account="acct1")),
    ("az://cont@acct1.blob.core.windows.net/a", Location("blob", "a", container="cont", account="acct1")),
    ("abfs://cont@acct1.dfs.core.windows.net/p/q", Location("blob", "p/q", container="cont", account="acct1")),
    ("abfss://cont@acct1.dfs.core.windows.net/p", Location("blob", "p", container="cont", account="acct1")),
    ("https://acct1.blob.core.windows.net/cont/p/q", Location("blob", "p/q", container="cont", account="acct1")),
    ("https://acct1.dfs.core.windows.net/cont/p", Location("blob", "p", container="cont", account="acct1")),
    ("datastore://name/p/q", Location("datastore", "p/q", datastore="name")),
    ("datastore://my_ds-2", Location("datastore", "", datastore="my_ds-2")),
    ("azureml://datastores/name/paths/p/q", Location("datastore", "p/q", datastore="name")),
    ("azureml://datastores/name/paths/p/", Location("datastore", "p", datastore="name")),
    ("azureml://datastores/name", Location("datastore", "", datastore="name")),
])
def test_parse_accepted_forms_and_uri_round_trip(text, expected):
    loc = parse(text)
    assert loc == expected
    assert parse(loc.uri) == loc  # the canonical spelling parses back to the same location
    assert str(loc) == loc.uri


def test_parse_uri_spellings():
    assert parse("https://acct1.blob.core.windows.net/cont/p").uri == "az://cont@acct1/p"
    assert parse("azureml://datastores/n/paths/a/b").uri == "datastore://n/a/b"
    assert parse("az://cont/").uri == "az://cont"
    assert parse("datastore://n").uri == "datastore://n"
    assert parse("file:///x/y").uri == "/x/y"
    assert parse("/x").is_local and not parse("az://cont/x").is_local


@pytest.mark.parametrize("text, message", [
    ("data/x", "is a relative path"),
    ("./x", "is a relative path"),
    ("az://cont/a/../b", "'..' is not allowed"),
    ("datastore://n/../x", "'..' is not allowed"),
    ("azureml://datastores/n/paths/a/../../b", "'..' is not allowed"),
    ("az://AB/x", "'AB' is not a valid container name"),
    ("az://a/x", "'a' is not a valid container name"),
    ("az://ab-/x", "not a valid container name"),
    ("az://a--b/x", "not a valid container name"),
    ("abfs://Cont@acct1.dfs.core.windows.net/x", "not a valid container name"),
    ("az://cont@Bad_Acct/x", "is not a storage account name"),
    ("abfs://cont@acct1.queue.core.windows.net/x", "cannot read a storage account"),
    ("https://x.file.core.windows.net/share/p", "Azure Files is used through a mount"),
    ("azfiles://share/p", "Azure Files is used through a mount"),
    ("smb://server/share", "Azure Files is used through a mount"),
    ("https://example.com/cont/p", "only Azure Blob URLs"),
    ("s3://bucket/x", "unsupported scheme 's3://'"),
    ("file://host/x", "file:// URLs name no host"),
    ("azureml://datastores/n/other/p", "expected azureml://datastores/<name>/paths/<path>"),
    ("datastore://na.me/x", "is not a datastore name"),
    ("", "empty location"),
    ("   ", "empty location"),
])
def test_parse_rejections_say_why(text, message):
    with pytest.raises(LocationError, match=None) as exc:
        parse(text)
    assert message in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_parse_rejection_messages_list_the_options():
    with pytest.raises(LocationError) as exc:
        parse("s3://bucket/x")
    for allowed in ("az://", "abfs", "datastore://", "azureml://datastores/", "file://"):
        assert allowed in str(exc.value)
    with pytest.raises(LocationError) as exc:
        parse("relative/p")
    assert "absolute path" in str(exc.value) and "az://container/path" in str(exc.value)
    with pytest.raises(LocationError) as exc:
        parse(None)  # type: ignore[arg-type]
    assert "empty location" in str(exc.value)


def test_location_join():
    assert parse("az://cont/a").join("b/", "/c").uri == "az://cont/a/b/c"
    assert parse("az://cont").join("x", "", "/").uri == "az://cont/x"
    assert parse("az://cont").join().uri == "az://cont"
    assert parse("az://cont@acct1/base").join("e", "j").uri == "az://cont@acct1/base/e/j"
    assert parse("az://cont@acct1/base").join("e") == Location("blob", "base/e", "cont", "acct1")
    assert parse("datastore://n").join("out", "x") == Location("datastore", "out/x", datastore="n")
    assert parse("datastore://n/p").join("x").uri == "datastore://n/p/x"
    assert parse("/data/root").join("exp", "/j/") == Location("local", "/data/root/exp/j")
    joined = parse("az://cont/a").join("b")
    assert parse(joined.uri) == joined


# ---- datastores file ----------------------------------------------------------------------
KEY_ENV = "RB_UNIT_STORAGE_KEY"
SECRET = "c2VjcmV0LWtleS1kby1ub3Qtc2hvdw=="


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def load_problem(tmp_path: Path, text: str) -> SpecError:
    f = write(tmp_path / "datastores.yaml", text)
    with pytest.raises(SpecError) as exc:
        Datastores.load(f)
    assert str(f) in str(exc.value)  # names the file
    return exc.value


@pytest.mark.parametrize("body, message", [
    ("""\
     datastores:
       b: {url: az://data, account: acct1, credential: {account_key: "%s"}}
     """ % SECRET, "secrets are not written in this file"),
    ("""\
     datastores:
       b: {url: az://data, account: acct1, credential: {connection_string: "%s"}}
     """ % SECRET, "secrets are not written in this file"),
    ("""\
     datastores:
       b: {url: az://data, account: acct1, credential: {account_key: {env: A}, sas_token: {env: B}}}
     """, "give exactly one of account_key, connection_string, sas_token"),
    ("""\
     datastores:
       b: {url: az://data, account: acct1, credential: {}}
     """, "give exactly one of account_key"),
    ("""\
     datastores:
       b: {url: az://data, account: acct1, credential: {account_key: {env: A, file: /x}}}
     """, "give exactly one of env or file"),
    ("""\
     datastores:
       b: {url: az://data, account: acct1}
     """, "needs a credential"),
    ("""\
     datastores:
       b: {url: az://data, credential: {identity: default}}
     """, "needs an account"),
    ("""\
     datastores:
       b: {url: az://data@acct1, account: acct2, credential: {anonymous: true}}
     """, "differs from the URL's"),
    ("""\
     datastores:
       l: {url: /mnt/nfs, credential: {account_key: {env: A}}}
     """, "takes no account, endpoint or credential"),
    ("""\
     datastores:
       l: {url: /mnt/nfs, account: acct1}
     """, "takes no account, endpoint or credential"),
    ("""\
     datastores:
       d: {url: datastore://other/x}
     """, "cannot point at another datastore"),
    ("""\
     datastores:
       b: {url: az://data, account: acct1, endpoint: ftp://x, credential: {anonymous: true}}
     """, "must be an http(s):// URL"),
    ("""\
     datastores:
       b: {url: relative/path}
     """, "is a relative path"),
    ("""\
     datastores:
       bad.name: {url: /mnt/x}
     """, "'bad.name' is not a datastore name"),
    ("""\
     default: nope
     datastores:
       l: {url: /mnt/x}
     """, "no datastore named 'nope'"),
    ("""\
     datastores:
       l: {url: /mnt/x, colour: red}
     """, "unknown field"),
    ("datastores: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_datastores_file_rejections(tmp_path, body, message):
    err = load_problem(tmp_path, body)
    assert message in str(err), str(err)
    assert SECRET not in str(err)  # an inline secret is never echoed back (it ends in logs)


def test_datastores_file_validates_without_a_file():
    with pytest.raises(ValueError, match="no datastore named 'x'"):
        DatastoresFile.model_validate({"default": "x"})
    assert DatastoresFile.model_validate({}).datastores == {}


@pytest.fixture
def stores(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET + "\n")
    (tmp_path / "sas").write_text("?sv=2024&sig=SASSECRET\n")
    (tmp_path / "cs").write_text("DefaultEndpointsProtocol=http;AccountName=csacct;AccountKey=CSKEY==;"
                                 "BlobEndpoint=http://127.0.0.1:10000/csacct/;")
    (tmp_path / "local").mkdir()
    f = write(tmp_path / "datastores.yaml", f"""\
        default: blob
        datastores:
          blob:
            url: az://data/base
            account: acct1
            credential: {{account_key: {{env: {KEY_ENV}}}}}
          viafile:
            url: az://other
            account: acct2
            endpoint: http://127.0.0.1:1/acct2/
            credential: {{sas_token: {{file: {tmp_path / 'sas'}}}}}
          cs:
            url: az://csdata/sets
            credential: {{connection_string: {{file: {tmp_path / 'cs'}}}}}
          local-ds:
            url: {tmp_path / 'local'}
          pub:
            url: abfs://pub@acct3.dfs.core.windows.net/x
            credential: {{anonymous: true}}
          unset:
            url: az://data
            account: acct4
            credential: {{account_key: {{env: RB_UNIT_NOT_SET}}}}
          missingfile:
            url: az://data
            account: acct5
            credential: {{account_key: {{file: {tmp_path / 'nope'}}}}}
          ident:
            url: az://data
            account: acct6
            credential: {{identity: default}}
        """)
    return Datastores.load(f)


def test_resolve_datastore_with_env_reference(stores):
    a = stores.resolve("datastore://blob/sub/f.txt")
    assert (a.kind, a.container, a.path, a.account) == ("blob", "data", "base/sub/f.txt", "acct1")
    assert a.endpoint == "https://acct1.blob.core.windows.net"
    assert (a.credential_kind, a.secret) == ("account_key", SECRET)  # read, stripped
    assert a.uri == "datastore://blob/sub/f.txt"
    assert stores.resolve("azureml://datastores/blob/paths/sub/f.txt") == a
    root = stores.resolve("datastore://blob")
    assert (root.path, root.uri) == ("base", "datastore://blob")


def test_resolve_file_reference_and_explicit_endpoint(stores):
    a = stores.resolve("datastore://viafile/x/y")
    assert (a.container, a.path, a.account) == ("other", "x/y", "acct2")
    assert a.endpoint == "http://127.0.0.1:1/acct2"
    assert (a.credential_kind, a.secret) == ("sas_token", "?sv=2024&sig=SASSECRET")


def test_resolve_connection_string_gives_account_and_endpoint(stores):
    a = stores.resolve("datastore://cs/y")
    assert (a.container, a.path, a.account) == ("csdata", "sets/y", "csacct")
    assert a.endpoint == "http://127.0.0.1:10000/csacct"
    assert a.credential_kind == "connection_string" and "CSKEY==" in a.secret


def test_resolve_bare_az_uses_the_default_datastore(stores):
    a = stores.resolve("az://results/runs/j1")
    assert (a.container, a.path, a.account) == ("results", "runs/j1", "acct1")
    assert a.secret == SECRET and a.uri == "az://results/runs/j1"


def test_resolve_account_urls(stores):
    a = stores.resolve("abfs://ccc@acct2.dfs.core.windows.net/p")  # the account of 'viafile'
    assert (a.account, a.container, a.path, a.credential_kind) == ("acct2", "ccc", "p", "sas_token")
    assert a.endpoint == "http://127.0.0.1:1/acct2"
    pub = stores.resolve("https://acct3.blob.core.windows.net/pub/x")
    assert (pub.credential_kind, pub.secret) == ("anonymous", None)
    other = stores.resolve("az://ccc@unknownacct/p")  # no datastore: DefaultAzureCredential
    assert (other.credential_kind, other.secret) == ("identity", None)
    assert other.endpoint == "https://unknownacct.blob.core.windows.net"
    ident = stores.resolve("datastore://ident/z")
    assert (ident.credential_kind, ident.secret) == ("identity", None)


def test_resolve_local(stores, tmp_path):
    a = stores.resolve("datastore://local-ds/sub/dir")
    assert (a.kind, a.path, a.secret) == ("local", str(tmp_path / "local" / "sub" / "dir"), None)
    assert stores.resolve("datastore://local-ds").path == str(tmp_path / "local")
    assert stores.resolve("/abs/p") == Access("local", "/abs/p", uri="/abs/p")


def test_resolve_credential_errors(stores, monkeypatch, tmp_path):
    monkeypatch.delenv("RB_UNIT_NOT_SET", raising=False)
    with pytest.raises(CredentialError, match="environment variable RB_UNIT_NOT_SET is not set") as exc:
        stores.resolve("datastore://unset/x")
    assert "datastore 'unset'" in str(exc.value)
    with pytest.raises(CredentialError, match="cannot read .*nope"):
        stores.resolve("datastore://missingfile/x")
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(CredentialError, match=KEY_ENV):
        stores.resolve("az://cont/x")
    (tmp_path / "sas").write_text("\n")
    with pytest.raises(CredentialError, match="is empty"):
        stores.resolve("datastore://viafile/x")


def test_resolve_and_check_location_errors(stores, tmp_path):
    with pytest.raises(LocationError) as exc:
        Datastores().resolve("az://cont/p")
    msg = str(exc.value)
    assert "no default datastore" in msg
    assert "datastore://name/path" in msg and "abfs://container@account" in msg and "'default'" in msg
    with pytest.raises(LocationError, match=r"no datastore named 'missing' \(defined: blob, cs, "):
        stores.resolve("datastore://missing/x")
    with pytest.raises(LocationError, match="none are defined"):
        Datastores().check("datastore://x/y")
    assert stores.check("az://cont/p") == parse("az://cont/p")
    # a default that is not Azure Blob cannot serve az:// locations
    f = write(tmp_path / "local-default.yaml", f"default: l\ndatastores:\n  l: {{url: {tmp_path}}}\n")
    with pytest.raises(LocationError, match="is not Azure Blob"):
        Datastores.load(f).resolve("az://cont/p")


def test_secrets_never_shown(stores):
    a = stores.resolve("datastore://blob/x")
    assert SECRET not in repr(a) and SECRET not in str(a)
    pub = a.public()
    assert "secret" not in pub and SECRET not in repr(pub)
    assert Access.from_dict(a.to_dict()) == a  # what a node receives keeps the secret
    child = a.child("y", "/z/")
    assert (child.path, child.uri, child.secret) == ("base/x/y/z", "datastore://blob/x/y/z", SECRET)
    assert SECRET not in repr(child)
    described = stores.describe()
    assert SECRET not in repr(described)
    blob = next(d for d in described if d["name"] == "blob")
    assert blob["credential"] == f"account_key (env {KEY_ENV})" and blob["default"] is True
    assert next(d for d in described if d["name"] == "local-ds")["credential"] is None
    assert stores.names == sorted(stores.names) and "local-ds" in stores.names


def test_missing_datastores_file_means_none(tmp_path):
    assert Datastores.load(tmp_path / "absent.yaml").names == []
    assert Datastores.load(write(tmp_path / "empty.yaml", "")).names == []


def test_watcher_reloads_on_change_and_keeps_last_good(tmp_path):
    f = tmp_path / "datastores.yaml"
    watcher = DatastoresFileWatcher(f)
    assert watcher().names == [] and watcher.error is None  # no file yet
    write(f, "datastores:\n  one: {url: /mnt/one}\n")
    t = time.time()
    os.utime(f, (t, t))
    time.sleep(1.05)  # the file is checked at most once a second
    assert watcher().names == ["one"]
    write(f, "datastores:\n  two: {url: /mnt/two}\n")
    os.utime(f, (t + 10, t + 10))
    assert watcher().names == ["one"]  # within the second: not checked again yet

    def recheck():
        watcher._checked = float("-inf")  # skip the 1 s throttle (shown above)
        return watcher()

    assert recheck().names == ["two"] and watcher.error is None
    write(f, "datastores:\n  bad: {url: relative}\n")
    os.utime(f, (t + 20, t + 20))
    assert recheck().names == ["two"]  # the last good definitions stay in force
    assert watcher.error and "is a relative path" in watcher.error and str(f) in watcher.error
    assert recheck().names == ["two"] and watcher.error  # unchanged bad file: still reported
    write(f, "datastores:\n  three: {url: /mnt/three}\n")
    os.utime(f, (t + 30, t + 30))
    assert recheck().names == ["three"] and watcher.error is None
    f.unlink()
    assert recheck().names == []


# ---- backends -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def container(azurite):
    name = f"unit-{uuid.uuid4().hex[:12]}"
    azurite.create_container(name)
    return name


def blob_access(azurite, container: str, path: str, key: str | None = None,
                endpoint: str | None = None) -> Access:
    return Access("blob", path, container=container, account=azurite.account_name,
                  endpoint=endpoint or azurite.endpoint, credential_kind="account_key",
                  secret=key or azurite.account_key, uri=f"az://{container}/{path}".rstrip("/"))


@pytest.fixture(params=["local", "blob"])
def make(request, tmp_path):
    """make() -> a Backend on a fresh, empty location of the parametrized kind."""
    def factory() -> Backend:
        prefix = f"t-{uuid.uuid4().hex[:10]}"
        if request.param == "local":
            return open_backend(Access("local", str(tmp_path / "remote" / prefix),
                                       uri=str(tmp_path / "remote" / prefix)))
        azurite = request.getfixturevalue("azurite")
        return open_backend(blob_access(azurite, request.getfixturevalue("container"), prefix))
    factory.kind = request.param
    return factory


def put(backend: Backend, rel: str, data: bytes, tmp: Path) -> None:
    src = tmp / f"src-{uuid.uuid4().hex}"
    src.write_bytes(data)
    backend.upload(src, rel)
    src.unlink()


def fetch(backend: Backend, rel: str, tmp: Path) -> bytes:
    dest = tmp / f"dl-{uuid.uuid4().hex}"
    backend.download(rel, dest)
    data = dest.read_bytes()
    dest.unlink()
    return data


def child(backend: Backend, *parts: str) -> Backend:
    return open_backend(backend.access.child(*parts))


def test_open_backend_kinds():
    assert type(open_backend(Access("local", "/x"))).__name__ == "LocalBackend"
    assert type(open_backend(Access("blob", "x", container="cont"))).__name__ == "BlobBackend"
    with pytest.raises(ValueError, match="unknown location kind"):
        open_backend(Access("s3", "x"))


def test_list_upload_download(make, tmp_path):
    b = make()
    files = {"a.txt": b"alpha\n", "nested/b.bin": os.urandom(5 * MiB + 7), "nested/deeper/c.csv": b"1,2,3\n",
             "empty": b""}
    for rel, data in files.items():
        put(b, rel, data, tmp_path)
    entries = b.list()
    assert [e.path for e in entries] == sorted(files)
    assert {e.path: e.size for e in entries} == {k: len(v) for k, v in files.items()}
    assert all(e.mtime > 0 for e in entries)
    assert [e.path for e in b.list("nested")] == ["b.bin", "deeper/c.csv"]  # relative to rel
    assert [e.path for e in b.list("nested/")] == ["b.bin", "deeper/c.csv"]
    single = b.list("nested/b.bin")
    assert [(e.path, e.size) for e in single] == [("", 5 * MiB + 7)]  # one file: path ''
    assert [(e.path, e.size) for e in child(b, "a.txt").list()] == [("", 6)]
    assert b.list("missing") == [] and b.list("nest") == []  # a prefix of a name is not a dir
    assert child(b, "missing").list() == []
    for rel, data in files.items():
        assert fetch(b, rel, tmp_path) == data
    moved = []
    b.download("nested/b.bin", tmp_path / "big", moved.append)
    assert sum(moved) == 5 * MiB + 7 and (tmp_path / "big").read_bytes() == files["nested/b.bin"]
    put(b, "a.txt", b"replaced", tmp_path)  # upload replaces
    assert fetch(b, "a.txt", tmp_path) == b"replaced"
    with pytest.raises(StorageError):
        b.download("missing", tmp_path / "x")


def test_blob_entries_carry_etag_and_content_md5(azurite, container, tmp_path):
    b = open_backend(blob_access(azurite, container, f"md5-{uuid.uuid4().hex[:8]}"))
    put(b, "small", b"hello", tmp_path)
    put(b, "big", os.urandom(5 * MiB), tmp_path)
    e = {x.path: x for x in b.list()}
    assert e["small"].md5 == hashlib.md5(b"hello").hexdigest()  # Azurite sets it on a one-shot put
    assert e["big"].md5 and e["small"].etag and e["big"].etag and e["small"].etag != e["big"].etag
    assert e["small"].mtime > 1.5e9


def test_blob_list_skips_directory_markers(azurite, container):
    """ADLS Gen2 (hierarchical namespace) accounts list directories as empty blobs with
    metadata hdi_isfolder=true: they are not files."""
    prefix = f"hns-{uuid.uuid4().hex[:8]}"
    cc = azurite.service_client().get_container_client(container)
    cc.upload_blob(f"{prefix}/dir", b"", metadata={"hdi_isfolder": "true"})
    cc.upload_blob(f"{prefix}/dir/file.txt", b"x")
    b = open_backend(blob_access(azurite, container, prefix))
    assert [e.path for e in b.list()] == ["dir/file.txt"]


def test_read(make, tmp_path):
    b = make()
    put(b, "f", b"0123456789", tmp_path)
    assert b.read("f", 0, 3) == (b"012", 10)
    assert b.read("f", 7, 100) == (b"789", 10)
    assert b.read("f", 10, 5) == (b"", 10)
    assert b.read("f", 25, 5) == (b"", 10)
    assert b.read("missing", 0, 5) == (b"", 0)
    assert b"".join(b.stream("f")) == b"0123456789"


def test_append_at_offsets_and_retries(make, tmp_path):
    b = make()
    b.append("logs/out.txt", b"hello ", 0)
    b.append("logs/out.txt", b"world", 6)
    b.append("logs/out.txt", b"world", 6)  # a retry of the same append: not written twice
    assert b.read("logs/out.txt", 0, 100) == (b"hello world", 11)
    big = os.urandom(9 * MiB + 3)  # more than one append block
    b.append("logs/out.txt", big, 11)
    data, size = b.read("logs/out.txt", 0, 20 * MiB)
    assert size == 11 + len(big) and data == b"hello world" + big
    b.append("logs/out.txt", big, 11)  # a retry of the whole multi-block append
    b.append("logs/out.txt", b"!", 11 + len(big))
    data, size = b.read("logs/out.txt", 0, 20 * MiB)
    assert data == b"hello world" + big + b"!" and size == len(data)


def test_blob_append_at_a_wrong_offset_fails(azurite, container):
    b = open_backend(blob_access(azurite, container, f"app-{uuid.uuid4().hex[:8]}"))
    b.append("log", b"abc", 0)
    with pytest.raises(StorageError) as exc:
        b.append("log", b"x", 10)  # a gap: never silently written
    assert not exc.value.transient
    with pytest.raises(StorageError):
        b.append("log", b"x", 1)  # would overwrite: refused
    assert b.read("log", 0, 10) == (b"abc", 3)


def test_local_check(tmp_path):
    missing = open_backend(Access("local", str(tmp_path / "no" / "such"), uri=str(tmp_path / "no" / "such")))
    with pytest.raises(StorageError, match="does not exist"):
        missing.check(write=False)
    missing.check(write=True)  # creates it
    assert (tmp_path / "no" / "such").is_dir()
    missing.check(write=False)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(StorageError, match="cannot create the directory"):
        open_backend(Access("local", str(blocked / "sub"), uri="x")).check(write=True)


def test_blob_check(azurite, container):
    open_backend(blob_access(azurite, container, "checked")).check(write=True)
    open_backend(blob_access(azurite, container, "")).check(write=False)
    with pytest.raises(StorageError) as exc:
        open_backend(blob_access(azurite, "no-such-container", "x")).check(write=True)
    assert "the container 'no-such-container' does not exist" in str(exc.value)
    assert azurite.account_name in str(exc.value) and not exc.value.transient
    with pytest.raises(StorageError, match="does not exist"):
        open_backend(blob_access(azurite, "no-such-container", "x")).list()


def test_blob_wrong_key_is_refused(azurite, container):
    wrong = azurite.account_key[:-6] + "AAAA=="
    b = open_backend(blob_access(azurite, container, "x", key=wrong))
    with pytest.raises(StorageError) as exc:
        b.check(write=True)
    assert "refused the credential account_key" in str(exc.value) and not exc.value.transient
    assert wrong not in str(exc.value)
    with pytest.raises(StorageError, match="refused"):
        b.list()


def test_blob_unreachable_endpoint_fails_fast(azurite, container):
    port = free_port()  # nothing listens there
    b = open_backend(blob_access(azurite, container, "x", endpoint=f"http://127.0.0.1:{port}/{azurite.account_name}"))
    t0 = time.monotonic()
    with pytest.raises(StorageError) as exc:
        b.check(write=False)
    took = time.monotonic() - t0
    assert took < 15, f"took {took:.1f} s"
    assert "cannot reach" in str(exc.value) and str(port) in str(exc.value)
    assert exc.value.transient


def test_datastore_resolved_to_azurite_works(azurite, container, tmp_path):
    cs = tmp_path / "cs"
    cs.write_text(azurite.connection_string)
    f = write(tmp_path / "ds.yaml", f"""\
        datastores:
          emu:
            url: az://{container}/via-ds
            credential: {{connection_string: {{file: {cs}}}}}
        """)
    access = Datastores.load(f).resolve("datastore://emu/sub")
    assert access.endpoint == azurite.endpoint and access.account == azurite.account_name
    b = open_backend(access)
    b.check(write=True)
    put(b, "f.txt", b"via datastore", tmp_path)
    blob = azurite.service_client().get_blob_client(container, "via-ds/sub/f.txt")
    assert blob.download_blob().readall() == b"via datastore"


# ---- the input cache ----------------------------------------------------------------------
def tree_of(path: str | Path) -> dict[str, bytes]:
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_stage_cold_warm_and_changed(make, tmp_path):
    b = make()
    files = {"a": os.urandom(1000), "b": os.urandom(2000), "sub/c": os.urandom(3000)}
    for rel, data in files.items():
        put(b, rel, data, tmp_path)
    cache = InputCache(tmp_path / "cache")
    seen = []
    r1 = cache.stage(b, lambda done, total: seen.append((done, total)))
    assert (r1.files, r1.bytes_total, r1.bytes_downloaded) == (3, 6000, 6000)
    assert seen[-1] == (6000, 6000)
    assert tree_of(r1.path) == files
    for p in Path(r1.path).rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, f"{p} is writable"
    r2 = cache.stage(b)
    assert (r2.path, r2.bytes_downloaded, r2.bytes_total) == (r1.path, 0, 6000)
    assert InputCache(tmp_path / "cache").stage(b).bytes_downloaded == 0  # another job on the node

    new_b = os.urandom(2500)
    put(b, "b", new_b, tmp_path)
    if make.kind == "local":  # make sure the change is seen whatever the mtime granularity
        later = time.time() + 10
        os.utime(Path(b.access.path, "b"), (later, later))
    r3 = cache.stage(b)
    assert r3.bytes_downloaded == 2500 and r3.bytes_total == 6500
    assert r3.path != r1.path
    assert tree_of(r3.path) == {**files, "b": new_b}
    assert tree_of(r1.path) == files  # the old tree is still there for jobs using it


def test_stage_single_file(make, tmp_path):
    b = make()
    put(b, "dir/model.bin", b"weights", tmp_path)
    r = InputCache(tmp_path / "cache").stage(child(b, "dir", "model.bin"))
    assert Path(r.path).is_file() and Path(r.path).name == "model.bin"
    assert Path(r.path).read_bytes() == b"weights"
    assert (r.files, r.bytes_total, r.bytes_downloaded) == (1, 7, 7)


def test_stage_missing_input(make, tmp_path):
    b = make()
    b.check(write=True)  # the driver's write check leaves nothing that counts as a file
    assert b.list() == []
    with pytest.raises(StorageError, match="no such file or directory") as exc:
        InputCache(tmp_path / "cache").stage(b)
    assert b.uri in str(exc.value)


def test_stage_identical_blobs_are_stored_once(azurite, container, tmp_path):
    data = os.urandom(4096)
    one = open_backend(blob_access(azurite, container, f"dup1-{uuid.uuid4().hex[:8]}"))
    two = open_backend(blob_access(azurite, container, f"dup2-{uuid.uuid4().hex[:8]}"))
    put(one, "x.bin", data, tmp_path)
    put(one, "y.bin", data, tmp_path)  # the same bytes twice in one input
    put(two, "other/name.bin", data, tmp_path)
    assert all(e.md5 for e in one.list() + two.list())  # keys come from Content-MD5
    cache = InputCache(tmp_path / "cache")
    r1 = cache.stage(one)
    assert (r1.bytes_total, r1.bytes_downloaded) == (8192, 4096)
    r2 = cache.stage(two)
    assert r2.bytes_downloaded == 0 and r2.path != r1.path
    assert tree_of(r2.path) == {"other/name.bin": data}
    assert os.stat(Path(r1.path, "x.bin")).st_ino == os.stat(Path(r2.path, "other/name.bin")).st_ino


def test_stage_concurrently_downloads_once(make, tmp_path):
    b = make()
    files = {f"f{i}": os.urandom(MiB) for i in range(4)}
    for rel, data in files.items():
        put(b, rel, data, tmp_path)
    start = threading.Barrier(2)
    results, errors = [], []

    class Slow(Backend):  # downloads take a while: the two stagers overlap
        def __init__(self):
            self.inner, self.access = open_backend(b.access), b.access

        def list(self, rel=""):
            return self.inner.list(rel)

        def download(self, rel, dest, progress=None):
            time.sleep(0.05)
            self.inner.download(rel, dest, progress)

    def stage():
        try:
            start.wait()
            results.append(InputCache(tmp_path / "cache").stage(Slow()))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=stage) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 2 and results[0].path == results[1].path
    assert sorted(r.bytes_downloaded for r in results) == [0, 4 * MiB]
    assert tree_of(results[0].path) == files


def test_download_tree(make, tmp_path):
    b = make()
    files = {"ckpt-1.pt": os.urandom(3000), "sub/ckpt-2.pt": os.urandom(5000), "sub/deep/meta.json": b"{}"}
    for rel, data in files.items():
        put(b, rel, data, tmp_path)
    b.check(write=True)  # what the driver does before an attempt: leaves a marker in blob storage
    dest = tmp_path / "restored"
    seen = []
    n, size = download_tree(b, dest, lambda done, total: seen.append((done, total)))
    assert (n, size) == (3, 8002) and seen[-1] == (8002, 8002)
    assert tree_of(dest) == files  # nothing else: the write-check marker is not a checkpoint
    remote = {e.path: e.mtime for e in b.list()}
    assert abs(os.stat(dest / "sub/ckpt-2.pt").st_mtime - remote["sub/ckpt-2.pt"]) < 1
    assert download_tree(child(b, "missing"), tmp_path / "none") == (0, 0)


# ---- sync ---------------------------------------------------------------------------------
class Recording(Backend):
    """A backend that records uploads/appends and can be told to fail."""

    def __init__(self, inner: Backend):
        self.inner, self.access = inner, inner.access
        self.uploads: list[str] = []
        self.appends: list[tuple[str, bytes, int]] = []
        self.fail: dict[str, StorageError] = {}

    def upload(self, src, rel):
        if rel in self.fail:
            raise self.fail[rel]
        self.uploads.append(rel)
        self.inner.upload(src, rel)

    def append(self, rel, data, offset):
        if rel in self.fail:
            raise self.fail[rel]
        self.appends.append((rel, data, offset))
        self.inner.append(rel, data, offset)

    def list(self, rel=""):
        return self.inner.list(rel)

    def read(self, rel, offset, length):
        return self.inner.read(rel, offset, length)


def test_dir_sync_uploads_new_and_changed_only(make, tmp_path):
    remote = Recording(make())
    local = tmp_path / "mirror"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("a1")
    (local / "sub" / "b.txt").write_text("b1")
    (local / ".upload-tmp123").write_text("partial")  # temp names are never uploaded
    (local / ".x.download").write_text("partial")  # download_tree's temp name
    (local / "data.download").write_text("a user's file")  # not ours: uploaded
    ds = DirSync(local, remote)
    assert ds.push() == 0
    assert sorted(remote.uploads) == ["a.txt", "data.download", "sub/b.txt"]
    remote.uploads.clear()
    assert ds.push() == 0 and remote.uploads == []  # nothing changed: nothing sent
    (local / "a.txt").write_text("a2-longer")
    t = time.time() + 5
    os.utime(local / "a.txt", (t, t))
    (local / "sub" / "c.txt").write_text("c1")
    assert ds.push() == 0
    assert sorted(remote.uploads) == ["a.txt", "sub/c.txt"]
    assert remote.read("a.txt", 0, 100) == (b"a2-longer", 9)
    assert sorted(e.path for e in remote.list()) == ["a.txt", "data.download", "sub/b.txt", "sub/c.txt"]
    os.utime(local / "sub" / "b.txt", (t + 1, t + 1))  # same size, new mtime: sent again
    remote.uploads.clear()
    assert ds.push() == 0 and remote.uploads == ["sub/b.txt"]
    (local / "a.txt").unlink()  # deleted locally: stays in storage
    assert ds.push() == 0 and remote.read("a.txt", 0, 100)[1] == 9


def test_dir_sync_failures(tmp_path):
    remote = Recording(open_backend(Access("local", str(tmp_path / "remote"), uri=str(tmp_path / "remote"))))
    local = tmp_path / "mirror"
    local.mkdir()
    (local / "ok").write_text("1")
    (local / "flaky").write_text("2")
    remote.fail["flaky"] = StorageError("uri/flaky", "cannot reach it", transient=True)
    ds = DirSync(local, remote)
    assert ds.push() == 1 and remote.uploads == ["ok"]
    assert ds.failed == {"flaky": "cannot reach it"}
    assert ds.pending() == [f"{remote.uri}/flaky"]
    del remote.fail["flaky"]
    assert ds.push() == 0 and ds.failed == {} and ds.pending() == []
    (local / "denied").write_text("3")
    remote.fail["denied"] = StorageError("uri/denied", "refused", transient=False)
    with pytest.raises(StorageError, match="refused"):
        ds.push()


def test_log_sync_appends_only_new_bytes(make, tmp_path):
    remote = Recording(make())
    log = tmp_path / "stdout.txt"
    ls = LogSync(log, remote, "rank-0/stdout.txt")
    assert ls.push(force=True) == 0 and remote.appends == []  # no file yet
    log.write_bytes(b"line 1\n")
    assert ls.push(force=True) == 0
    with open(log, "ab") as f:
        f.write(b"line 2\n")
    assert ls.pending() == [f"{remote.uri}/rank-0/stdout.txt (7 bytes)"]
    assert ls.push(force=True) == 0 and ls.pending() == []
    assert ls.push(force=True) == 0  # nothing new: no request
    with open(log, "ab") as f:
        f.write(b"early\n")
    assert ls.push() == 0 and ls.pending()  # within LOG_INTERVAL_S of the last append: not due yet
    ls.last = float("-inf")
    assert ls.push() == 0 and not ls.pending()
    assert remote.appends == [("rank-0/stdout.txt", b"line 1\n", 0), ("rank-0/stdout.txt", b"line 2\n", 7),
                              ("rank-0/stdout.txt", b"early\n", 14)]
    assert remote.read("rank-0/stdout.txt", 0, 100) == (b"line 1\nline 2\nearly\n", 20)
    remote.fail["rank-0/stdout.txt"] = StorageError("u", "cannot reach", transient=True)
    with open(log, "ab") as f:
        f.write(b"line 3\n")
    with pytest.raises(StorageError):
        ls.push(force=True)
    del remote.fail["rank-0/stdout.txt"]
    assert ls.push(force=True) == 0  # the failed bytes are sent once, later
    assert remote.read("rank-0/stdout.txt", 0, 100)[0] == b"line 1\nline 2\nearly\nline 3\n"


def test_node_sync_thread_and_finish(make, tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "LOG_INTERVAL_S", 0.05)
    remote = make()
    out, log = tmp_path / "out", tmp_path / "rank.log"
    out.mkdir()
    log.write_bytes(b"started\n")
    ns = NodeSync([DirSync(out, child(remote, "outputs"))], [LogSync(log, remote, "logs/rank.log")],
                  interval=0.05)
    ns.start()
    deadline = time.monotonic() + 10
    while remote.read("logs/rank.log", 0, 100)[0] != b"started\n" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote.read("logs/rank.log", 0, 100)[0] == b"started\n"  # live, while running
    (out / "model.bin").write_bytes(b"m" * 1000)
    with open(log, "ab") as f:
        f.write(b"done\n")
    report = ns.finish(timeout=5)
    assert report == SyncReport() and report.unsynced == [] and report.error is None
    assert remote.read("logs/rank.log", 0, 100)[0] == b"started\ndone\n"
    assert remote.read("outputs/model.bin", 0, 2000)[1] == 1000
    assert NodeSync([], [], 1).finish(1) == SyncReport()  # nothing to sync: never started


def test_node_sync_finish_with_storage_down_names_what_is_not_out(azurite, container, tmp_path, monkeypatch):
    # fail each request at once (no SDK retries) so the deadline is what ends finish()
    monkeypatch.setattr(backends, "SDK_RETRIES", 0)
    monkeypatch.setattr(backends, "_clients", {})
    remote = open_backend(blob_access(azurite, container, f"down-{uuid.uuid4().hex[:8]}"))
    out, log = tmp_path / "out", tmp_path / "rank.log"
    out.mkdir()
    (out / "model.bin").write_bytes(b"weights")
    log.write_bytes(b"hello\n")
    dirs_only = NodeSync([DirSync(out, child(remote, "outputs"))], [], interval=60)
    both = NodeSync([DirSync(out, child(remote, "more"))], [LogSync(log, remote, "logs/rank.log")], interval=60)
    azurite.stop()
    try:
        t0 = time.monotonic()
        report = dirs_only.finish(timeout=3)
        assert time.monotonic() - t0 < 10
        assert report.unsynced == [f"{remote.uri}/outputs/model.bin"]
        assert report.error and "cannot reach" in report.error  # the cause, also for outputs alone
        report = both.finish(timeout=3)
        assert sorted(report.unsynced) == [f"{remote.uri}/logs/rank.log (6 bytes)", f"{remote.uri}/more/model.bin"]
        assert "cannot reach" in report.error
    finally:
        azurite.start()


def test_node_sync_finish_waits_for_storage_to_come_back(azurite, container, tmp_path):
    remote = open_backend(blob_access(azurite, container, f"back-{uuid.uuid4().hex[:8]}"))
    remote.check(write=True)  # the client has a connection open before the outage
    out, log = tmp_path / "out", tmp_path / "rank.log"
    out.mkdir()
    (out / "model.bin").write_bytes(b"weights")
    log.write_bytes(b"hello\n")
    ns = NodeSync([DirSync(out, child(remote, "outputs"))], [LogSync(log, remote, "logs/rank.log")], interval=60)
    azurite.stop()

    def restart():
        time.sleep(2)
        azurite.start()

    t = threading.Thread(target=restart)
    t.start()
    try:
        report = ns.finish(timeout=15)
        assert report == SyncReport(), report
    finally:
        t.join(60)
        azurite.start()
    assert remote.read("outputs/model.bin", 0, 100) == (b"weights", 7)
    assert remote.read("logs/rank.log", 0, 100) == (b"hello\n", 6)


# ---- plan ---------------------------------------------------------------------------------
def spec(**kw) -> JobSpec:
    return JobSpec(**{"name": "j", "command": "true", "outputs": {"model": {}, "ext": {"path": "az://other/x"}},
                      **kw})


def test_job_locations_and_locate():
    s = spec()
    jd = "az://results/exp/j1"
    tree = job_locations(s, jd)
    assert tree == {"stdouterr": "az://results/exp/j1/stdouterr", "checkpoints": "az://results/exp/j1/checkpoints",
                    "outputs/model": "az://results/exp/j1/outputs/model", "outputs/ext": "az://other/x"}
    everything = [(r, loc, "") for r, loc in tree.items()]
    assert locate(s, jd, "") == everything
    assert locate(s, jd, "/") == everything
    assert locate(s, jd, ".") == everything
    assert locate(s, jd, "outputs") == [("outputs/model", tree["outputs/model"], ""),
                                         ("outputs/ext", tree["outputs/ext"], "")]
    assert locate(s, jd, "outputs/model") == [("outputs/model", tree["outputs/model"], "")]
    assert locate(s, jd, "outputs/model/sub/f.txt") == [("outputs/model", tree["outputs/model"], "sub/f.txt")]
    assert locate(s, jd, "/stdouterr/attempt-1/") == [("stdouterr", tree["stdouterr"], "attempt-1")]
    assert locate(s, jd, "outputs/ext/a/../b") == [("outputs/ext", "az://other/x", "b")]
    for bad in ("../x", "nope", "outputs/mod", "stdouterr2"):
        with pytest.raises(ValueError) as exc:
            locate(s, jd, bad)
        assert f"path '{bad}' is not in the job's files" in str(exc.value)
        assert "stdouterr, checkpoints, outputs/model, outputs/ext" in str(exc.value)


def test_job_dir_for(tmp_path):
    assert job_dir_for(str(tmp_path / "a" / ".." / "root"), "exp", "j1") == str(tmp_path / "root" / "exp" / "j1")
    assert job_dir_for("az://results/runs", "exp", "j1") == "az://results/runs/exp/j1"
    assert job_dir_for("az://results", "exp", "j1") == "az://results/exp/j1"
    assert job_dir_for("datastore://res/jobs/", "exp", "j1") == "datastore://res/jobs/exp/j1"
    assert job_dir_for("abfs://res@acct1.dfs.core.windows.net/r", "e", "j") == "az://res@acct1/r/e/j"
    local = job_locations(spec(), job_dir_for(str(tmp_path), "exp", "j1"))
    assert local["outputs/model"] == str(tmp_path / "exp" / "j1" / "outputs" / "model")


def test_check_locations_one_problem_per_bad_field(stores):
    s = spec(inputs={"good": {"path": "datastore://blob/x"}, "bad": {"path": "datastore://nope/x"}},
             outputs={"fine": {}, "out": {"path": "datastore://missing/o"}, "also": {"path": "/mnt/o"}})
    problems = check_locations(s, "datastore://gone/jobs", stores)
    assert len(problems) == 3, problems
    assert problems[0].startswith("output_root: ") and "'gone'" in problems[0]
    assert problems[1].startswith("inputs.bad.path: ") and "'nope'" in problems[1]
    assert problems[2].startswith("outputs.out.path: ") and "'missing'" in problems[2]
    assert check_locations(s, None, stores)[0].startswith("inputs.bad.path")
    ok = spec(inputs={"i": {"path": "az://cont/p"}})
    assert check_locations(ok, "az://results/r", stores) == []
    assert check_locations(ok, "az://results/r", Datastores()) == [
        f"output_root: {_msg(lambda: Datastores().check('az://results/r'))}",
        f"inputs.i.path: {_msg(lambda: Datastores().check('az://cont/p'))}",
        "outputs.ext.path: " + _msg(lambda: Datastores().check("az://other/x"))]


def _msg(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    raise AssertionError("no error")


def test_local_backend_does_not_serve_links_to_outside_the_location(tmp_path):
    from raybatch.storage.backends import LocalBackend, StorageError
    from raybatch.storage.datastores import Access

    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    root = tmp_path / "outputs"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.txt").write_text("fine")
    (root / "sub" / "link.txt").symlink_to(secret)
    (root / "inner.txt").symlink_to(root / "sub" / "ok.txt")
    b = LocalBackend(Access("local", str(root), uri=str(root)))
    assert b.read("sub/ok.txt", 0, 100) == (b"fine", 4)
    with pytest.raises(StorageError, match="symbolic link"):  # no link is followed, even one inside
        b.read("inner.txt", 0, 100)
    with pytest.raises(StorageError, match="symbolic link"):
        b.read("sub/link.txt", 0, 100)
    with pytest.raises(StorageError, match="symbolic link"):
        list(b.stream("sub/link.txt"))
