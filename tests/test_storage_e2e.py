"""Storage end to end: a real 2-node Ray cluster, a real raybatch server and a real
Azure Blob service (Azurite). Inputs staged from blob, outputs/checkpoints/logs
written back to blob, the file listing and download, bad locations failing fast,
Azurite going away during the last upload, and secrets never leaking."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raybatch.client import RaybatchError
from raybatch.spec.loader import SpecError
from tests.conftest import ServerProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(300)

KEY_ENV = "RB_TEST_STORAGE_KEY"


@pytest.fixture(scope="module")
def env(azurite, ray_cluster, tmp_path_factory):
    """Containers, a datastores file, a server that reads its storage key from its environment."""
    for name in ("data", "results"):
        azurite.create_container(name)
    state = tmp_path_factory.mktemp("server")
    cs_file = state / "results.connstr"
    cs_file.write_text(azurite.connection_string)
    cs_file.chmod(0o600)
    closed = free_port()
    common = f"account: {azurite.account_name}\n    endpoint: {azurite.endpoint}"
    (state / "datastores.yaml").write_text(textwrap.dedent(f"""\
        default: blob
        datastores:
          blob:
            url: az://data
            ACCOUNT
            credential: {{account_key: {{env: {KEY_ENV}}}}}
          results:
            url: az://results/runs
            credential: {{connection_string: {{file: {cs_file}}}}}
          wrongkey:
            url: az://data
            ACCOUNT
            credential: {{account_key: {{env: RB_TEST_WRONG_KEY}}}}
          nocontainer:
            url: az://no-such-container
            ACCOUNT
            credential: {{account_key: {{env: {KEY_ENV}}}}}
          unreachable:
            url: az://data
            account: {azurite.account_name}
            endpoint: http://127.0.0.1:{closed}/{azurite.account_name}
            credential: {{account_key: {{env: {KEY_ENV}}}}}
          unsetkey:
            url: az://data
            ACCOUNT
            credential: {{account_key: {{env: RB_TEST_NOT_SET}}}}
        """).replace("ACCOUNT", common))
    wrong = azurite.account_key[:-6] + "AAAA=="
    server = ServerProcess(ray_cluster, state, env={
        KEY_ENV: azurite.account_key, "RB_TEST_WRONG_KEY": wrong,
        "RAYBATCH_STORAGE_CHECK_S": "6", "RAYBATCH_FINAL_SYNC_TIMEOUT_S": "25",
        "RAYBATCH_CACHE_DIR": str(state / "cache"),
    }).start()
    client = server.client()
    yield {"server": server, "client": client, "azurite": azurite, "state": state,
           "cluster": ray_cluster, "cache": state / "cache"}
    client.close()
    server.stop()


def submit(client, **fields):
    base = {"name": "storage", "experiment": "storage", "resources": {"cpus": 1},
            "output_root": "datastore://results/jobs", "max_wall_clock": "5m"}
    return client.submit({**base, **fields})


def script(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return f"{sys.executable} {p}"


def blob_names(azurite, container: str, prefix: str) -> dict[str, bytes]:
    cc = azurite.service_client().get_container_client(container)
    return {b.name[len(prefix):]: cc.download_blob(b.name).readall()
            for b in cc.list_blobs(name_starts_with=prefix)}


def driver_log(env, job_id: str, attempt: int = 1) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(env["cluster"].dashboard_url).get_job_logs(f"raybatch-{job_id}-{attempt}")


# ---------------------------------------------------------------------------------------
def test_inputs_outputs_and_logs_round_trip_through_blob(env, tmp_path):
    azurite, client = env["azurite"], env["client"]
    data = azurite.service_client().get_container_client("data")
    uploaded = {"a.txt": b"alpha\n", "nested/b.bin": os.urandom(3 * 2**20), "nested/deeper/c.csv": b"1,2,3\n"}
    for name, blob in uploaded.items():
        data.upload_blob(f"sets/round/{name}", blob, overwrite=True)
    cmd = script(tmp_path, "round.py", """\
        import hashlib, json, os, pathlib
        inp = pathlib.Path(os.environ["RAYBATCH_INPUT_DS"])
        files = {p.relative_to(inp).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in inp.rglob("*") if p.is_file()}
        rank = os.environ["RANK"]
        out = pathlib.Path(os.environ["RAYBATCH_OUTPUT_MODEL"])
        (out / f"rank-{rank}.json").write_text(json.dumps(files))
        if rank == "0":
            (out / "sub").mkdir(exist_ok=True)
            (out / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
        print(f"rank {rank} read {len(files)} files from {inp}", flush=True)
        print("key visible:", "RB_TEST_STORAGE_KEY" in os.environ, flush=True)
    """)
    sub = submit(client, name="round-trip", nodes=2, command=cmd,
                 inputs={"ds": "datastore://blob/sets/round"}, outputs={"model": {}})
    done = client.wait(sub.id, timeout=120)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(sub.id, stream="stderr"))
    assert len({r.node_id for r in done.attempts[-1].ranks}) == 2
    assert done.spec.inputs["ds"].mode == "download"  # the default for blob inputs
    # where the files are: the job's directory in the results datastore
    assert done.outputs["model"] == f"datastore://results/jobs/storage/{sub.id}/outputs/model"
    assert done.logs_dir.startswith("datastore://results/jobs/")
    expected = {k: hashlib.sha256(v).hexdigest() for k, v in uploaded.items()}
    prefix = f"runs/jobs/storage/{sub.id}/"
    blobs = blob_names(azurite, "results", prefix)
    for rank in (0, 1):
        assert json.loads(blobs[f"outputs/model/rank-{rank}.json"]) == expected
    assert blobs["outputs/model/sub/weights.bin"] == bytes(range(256)) * 4096
    assert b"rank 1 read 3 files" in blobs["stdouterr/attempt-1/rank-1/stdout.txt"]
    # logs through the API come from blob too
    assert "rank 0 read 3 files" in client.logs(sub.id, rank=0)
    assert "key visible: False" in client.logs(sub.id, rank=0)  # the storage key is not the job's
    # raybatch files / download
    listing = {f.path: f for f in client.files(sub.id)}
    assert listing["outputs/model/sub/weights.bin"].size == 256 * 4096
    assert listing["outputs/model/sub/weights.bin"].location.endswith("outputs/model/sub/weights.bin")
    assert "stdouterr/attempt-1/rank-0/stdout.txt" in listing
    assert [f.path for f in client.files(sub.id, "outputs/model/sub")] == ["outputs/model/sub/weights.bin"]
    got = client.download(sub.id, tmp_path / "dl", "outputs/model")
    assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in got) == [
        "rank-0.json", "rank-1.json", "sub/weights.bin"]
    assert (tmp_path / "dl" / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 4096
    with pytest.raises(RaybatchError, match="not in the job's files"):
        client.files(sub.id, "../etc")
    # the mirrors on the nodes are gone once everything is uploaded
    from raybatch.private_dir import private_path  # noqa: PLC0415

    assert private_path("mirror").is_dir()  # the mirrors were made there ...
    assert not list(private_path("mirror").glob(f"{sub.id}/*/*"))  # ... and removed

    # a second job with the same input: the node's cache is warm, nothing is downloaded
    again = submit(client, name="round-trip-2", nodes=2, command=cmd,
                   inputs={"ds": "azureml://datastores/blob/paths/sets/round"}, outputs={"model": {}})
    done2 = client.wait(again.id, timeout=120)
    assert done2.state == "SUCCEEDED", done2.reason
    assert re.findall(r"input 'ds': 3 file\(s\), \d+ bytes, 0 downloaded", driver_log(env, again.id))
    first = driver_log(env, sub.id)
    assert re.findall(r"input 'ds': 3 file\(s\), (\d+) bytes, \1 downloaded", first)


def test_no_secret_in_store_api_ray_metadata_or_logs(env, tmp_path):
    client, key = env["client"], env["azurite"].account_key
    sub = submit(client, name="secret-check", command="echo ok", inputs={"ds": "datastore://blob/sets/round"})
    done = client.wait(sub.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    state = env["state"]
    needles = [key.encode(), env["azurite"].connection_string.encode()]
    for path in state.rglob("*"):
        if path.is_file() and path.name != "results.connstr" and "cache" not in path.parts:
            data = path.read_bytes()
            assert not any(n in data for n in needles), f"secret found in {path}"
    assert not list(state.rglob("secrets.json")), "the credentials file outlived its attempt"
    api = json.dumps([client.get(sub.id).model_dump(mode="json"), client.datastores(),
                      [f.model_dump() for f in client.files(sub.id)]])
    assert key not in api and "AccountKey" not in api
    assert "account_key (env RB_TEST_STORAGE_KEY)" in api
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(env["cluster"].dashboard_url).get_job_info(f"raybatch-{sub.id}-1")
    assert key not in json.dumps([info.metadata, info.runtime_env, info.entrypoint], default=str)
    assert key not in driver_log(env, sub.id)


def test_live_logs_and_outputs_synced_on_cancel(env, tmp_path):
    client, azurite = env["client"], env["azurite"]
    cmd = script(tmp_path, "ticker.py", """\
        import os, pathlib, signal, sys, time
        out = pathlib.Path(os.environ["RAYBATCH_OUTPUT_OUT"])
        def bye(*_):
            (out / "on-sigterm.txt").write_text("saved at SIGTERM")
            print("got SIGTERM", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, bye)
        for i in range(600):
            print(f"tick {i}", flush=True)
            (out / "progress.txt").write_text(str(i))
            time.sleep(0.3)
    """)
    sub = submit(client, name="ticker", command=cmd, outputs={"out": {}}, sync_interval="1s",
                 grace_period="10s")
    wait_for(lambda: "tick 5" in client.logs(sub.id), 60, "live log lines from blob")
    assert client.get(sub.id).state == "RUNNING"  # read while the job runs
    wait_for(lambda: any(f.path == "outputs/out/progress.txt" for f in client.files(sub.id)), 30,
             "an output uploaded during the run")
    client.cancel(sub.id)
    done = client.wait(sub.id, timeout=60)
    assert done.state == "CANCELLED"
    blobs = blob_names(azurite, "results", f"runs/jobs/storage/{sub.id}/")
    assert blobs["outputs/out/on-sigterm.txt"] == b"saved at SIGTERM"
    assert b"got SIGTERM" in blobs["stdouterr/attempt-1/rank-0/stdout.txt"]


def test_checkpoint_restored_on_another_node_after_a_restart(env, tmp_path):
    client, cluster = env["client"], env["cluster"]
    first = cluster.add_node(1, resources={"ckpt_node": 1})
    second = None
    cmd = script(tmp_path, "resume.py", """\
        import os, pathlib, time
        ck = pathlib.Path(os.environ["RAYBATCH_CHECKPOINT_DIR"]) / "state.txt"
        epoch = int(ck.read_text()) if ck.exists() else 0
        print(f"attempt {os.environ['RAYBATCH_ATTEMPT']} starts at epoch {epoch} in {ck.parent}", flush=True)
        for e in range(epoch + 1, 200):
            time.sleep(0.5)
            tmp = ck.with_name(".state.tmp")
            tmp.write_text(str(e))
            os.replace(tmp, ck)   # checkpoints written whole, then renamed
            print(f"epoch {e}", flush=True)
            if e >= 12 and os.environ["RAYBATCH_ATTEMPT"] != "1":
                break
    """)
    try:
        sub = submit(client, name="resume", command=cmd, sync_interval="1s",
                     resources={"cpus": 1, "custom": {"ckpt_node": 1}}, retries={"infrastructure": 2})
        wait_for(lambda: "epoch 6" in client.logs(sub.id), 90, "epoch 6 of attempt 1")
        ranks = client.get(sub.id).attempts[-1].ranks
        assert ranks[0].node_id == first.node_id
        second = cluster.add_node(1, resources={"ckpt_node": 1})
        cluster.cluster.remove_node(first)  # the node dies with its local checkpoint copy
        done = client.wait(sub.id, timeout=180)
        assert done.state == "SUCCEEDED", done.reason
        assert done.attempts[0].outcome == "NODE_LOST"
        last = done.attempts[-1]
        assert last.ranks[0].node_id == second.node_id != first.node_id
        log = client.logs(sub.id, attempt=last.n)
        resumed = int(re.search(r"starts at epoch (\d+)", log).group(1))
        assert resumed >= 4, log  # restored from blob, not from scratch
    finally:
        if second is not None:
            cluster.cluster.remove_node(second)


@pytest.mark.parametrize("store, cause", [
    ("wrongkey", r"refused the credential account_key"),
    ("nocontainer", r"the container 'no-such-container' does not exist in storage account 'devstoreaccount1'"),
    ("unreachable", r"cannot reach http://127\.0\.0\.1:\d+/devstoreaccount1"),
    ("unsetkey", r"environment variable RB_TEST_NOT_SET is not set on the server"),
])
def test_bad_storage_fails_at_start_with_the_cause(env, store, cause):
    client = env["client"]
    t0 = time.monotonic()
    sub = submit(client, name=f"bad-{store}", command="echo never",
                 inputs={"ds": f"datastore://{store}/sets/round"}, output_root=None)
    done = client.wait(sub.id, timeout=90)
    took = time.monotonic() - t0
    assert done.state == "FAILED"
    assert done.attempts[-1].outcome == "START_FAILED"
    assert f"datastore://{store}/sets/round" in done.reason or store == "unsetkey", done.reason
    assert re.search(cause, done.reason), done.reason
    assert took < 45, f"took {took:.0f} s to fail"
    assert done.attempts[-1].ranks == []  # nothing ran


def test_unknown_datastore_and_bad_locations_are_rejected_at_submit(env):
    client = env["client"]
    with pytest.raises(RaybatchError, match=r"inputs\.ds\.path: 'datastore://nope/x': no datastore named "
                                            r"'nope' \(defined: blob, nocontainer, results"):
        submit(client, command="true", inputs={"ds": "datastore://nope/x"})
    with pytest.raises(SpecError, match=r"outputs\.m\.path: .*Azure Files is used through a mount"):
        submit(client, command="true", outputs={"m": "https://acct.file.core.windows.net/share/x"})
    n = len(client.list())
    with pytest.raises(RaybatchError, match="no datastore named"):
        client.submit_many([{"name": "ok", "command": "true"},
                            {"name": "bad", "command": "true", "output_root": "datastore://nope"}])
    assert len(client.list()) == n  # all or none


def test_blob_outage_during_the_final_upload_loses_nothing(env, tmp_path):
    client, azurite = env["client"], env["azurite"]
    cmd = script(tmp_path, "writer.py", """\
        import os, pathlib, time
        out = pathlib.Path(os.environ["RAYBATCH_OUTPUT_OUT"])
        for i in range(5):
            (out / f"part-{i}.bin").write_bytes(bytes([i]) * 400_000)
        print("written", flush=True)
        time.sleep(3)
    """)
    sub = submit(client, name="outage", command=cmd, outputs={"out": {}}, sync_interval="1h")
    wait_for(lambda: "written" in client.logs(sub.id), 60, "the job to write its outputs")
    azurite.stop()
    try:
        time.sleep(6)  # the job ends meanwhile; its final upload fails and retries
    finally:
        azurite.start()
    done = client.wait(sub.id, timeout=90)
    assert done.state == "SUCCEEDED", done.reason
    blobs = blob_names(azurite, "results", f"runs/jobs/storage/{sub.id}/outputs/out/")
    assert {k: len(v) for k, v in blobs.items()} == {f"part-{i}.bin": 400_000 for i in range(5)}
    assert all(blobs[f"part-{i}.bin"] == bytes([i]) * 400_000 for i in range(5))


def test_an_upload_that_keeps_failing_keeps_the_local_copy_and_names_the_files(env, tmp_path):
    client, azurite = env["client"], env["azurite"]
    cmd = script(tmp_path, "writer2.py", """\
        import os, pathlib, time
        out = pathlib.Path(os.environ["RAYBATCH_OUTPUT_OUT"])
        (out / "result.bin").write_bytes(b"x" * 100_000)
        print("written", flush=True)
        time.sleep(2)
    """)
    sub = submit(client, name="lost-upload", command=cmd, outputs={"out": {}}, sync_interval="1h")
    wait_for(lambda: "written" in client.logs(sub.id), 60, "the job to write its outputs")
    azurite.stop()
    try:
        done = client.wait(sub.id, timeout=90)  # the final upload gives up after 25 s
    finally:
        azurite.start()
    assert done.state == "FAILED"
    assert done.attempts[-1].outcome == "UPLOAD_FAILED"
    assert "outputs/out/result.bin" in done.reason and "not uploaded" in done.reason, done.reason
    kept = re.search(r"the local copies are kept at \S+?:(\S+)", done.reason).group(1).rstrip(";,")
    assert (Path(kept) / "outputs" / "out" / "result.bin").read_bytes() == b"x" * 100_000


def test_cli_files_download_and_datastores(env, tmp_path):
    from tests.test_cli_and_restart import cli

    client, server = env["client"], env["server"]
    cmd = script(tmp_path, "cli.py", """\
        import os, pathlib
        out = pathlib.Path(os.environ["RAYBATCH_OUTPUT_M"])
        (out / "deep").mkdir()
        (out / "deep" / "w.bin").write_bytes(b"w" * 70_000)
        print("done", flush=True)
    """)
    sub = submit(client, name="cli-files", command=cmd, outputs={"m": {}})
    assert client.wait(sub.id, timeout=120).state == "SUCCEEDED"
    table = cli(server, "files", sub.id, check=True).stdout
    assert "outputs/m/deep/w.bin" in table and "68.4 KiB" in table and "stdouterr/attempt-1/rank-0/stdout.txt" in table
    rows = json.loads(cli(server, "files", sub.id, "--path", "outputs/m", "-o", "json", check=True).stdout)
    assert [(r["path"], r["size"]) for r in rows] == [("outputs/m/deep/w.bin", 70_000)]
    p = cli(server, "download", sub.id, str(tmp_path / "got"), "--path", "outputs/m", check=True)
    assert "1 file(s)" in p.stdout
    assert (tmp_path / "got" / "deep" / "w.bin").read_bytes() == b"w" * 70_000
    p = cli(server, "download", sub.id, str(tmp_path / "one"), "--path", "outputs/m/deep/w.bin", check=True)
    assert (tmp_path / "one" / "w.bin").stat().st_size == 70_000
    p = cli(server, "files", sub.id, "--path", "nowhere")
    assert p.returncode == 1 and "not in the job's files" in p.stderr
    ds = json.loads(cli(server, "datastores", "-o", "json", check=True).stdout)
    by_name = {d["name"]: d for d in ds["datastores"]}
    assert by_name["blob"]["credential"] == f"account_key (env {KEY_ENV})" and by_name["blob"]["default"]
    assert env["azurite"].account_key not in json.dumps(ds)
    assert "results" in cli(server, "datastores", check=True).stdout
