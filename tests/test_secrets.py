"""Job secrets without a cluster: the job file's ``secrets:`` (names, references, how a spec
shows them), what the client reads at submit, the server's encryption at rest (the raw
SQLite file is read: the value must not be in it), the key file, Key Vault references
(only the SecretClient's network call is replaced: Key Vault cannot be reached here), and
the masking of a rank's output (through a real pipe and the rank actor's tee)."""

from __future__ import annotations

import io
import os
import random
import stat
import threading

import pytest
import yaml
from pydantic import SecretStr

from raybatch.models import SubmitRequest
from raybatch.runtime import secrets as rs
from raybatch.runtime.rank import _tee
from raybatch.spec.job import JobSpec
from raybatch.spec.loader import SpecError, load_job_file
from raybatch.spec.secrets import MASK, SecretRef, parse_keyvault
from raybatch.state.store import Store

VALUE = "rb-unit-secret-7f3a9c41d2"


def spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"name": "s", "command": "true", **fields})


# ---- the job file ----------------------------------------------------------------------------
def test_every_dump_of_a_spec_shows_names_only():
    s = spec(secrets={"API_KEY": VALUE, "NUM": 12345, "KV": {"keyvault": "myvault/db-pass"}})
    shown = {"API_KEY": MASK, "NUM": MASK, "KV": {"keyvault": "myvault/db-pass"}}
    assert s.model_dump()["secrets"] == shown
    assert s.model_dump(mode="json")["secrets"] == shown
    assert VALUE not in s.model_dump_json() and VALUE not in repr(s) and VALUE not in str(s)
    back = JobSpec.model_validate_json(s.model_dump_json())  # the stored spec: names, no values
    assert back.secrets["API_KEY"].get_secret_value() == MASK
    assert s.secrets["API_KEY"].get_secret_value() == VALUE  # only an explicit read reveals it
    # Batch AI's list form, as environment accepts it
    assert spec(secrets=[{"name": "A", "value": "x1234"}]).secrets["A"].get_secret_value() == "x1234"


@pytest.mark.parametrize("secrets, environment, words", [
    ({"1BAD": "v"}, {}, "'1BAD' is not a valid environment variable name"),
    ({"MY-KEY": "v"}, {}, "'MY-KEY' is not a valid environment variable name"),
    ({"AZ_BATCHAI_JOB_NAME": "v"}, {}, "'AZ_BATCHAI_JOB_NAME' is a variable raybatch sets"),
    ({"RAYBATCH_X": "v"}, {}, "'RAYBATCH_X' is a variable raybatch sets"),
    ({"RANK": "v"}, {}, "'RANK' is a variable raybatch sets"),
    ({"MASTER_ADDR": "v"}, {}, "'MASTER_ADDR' is a variable raybatch sets"),
    ({"TOKEN": "v"}, {"TOKEN": "x"}, "'TOKEN' is also in environment"),
    ({"T": {"env": "A", "file": "b"}}, {}, "'T': a secret reference is one of"),
    ({"T": {"vault": "x"}}, {}, "'T': vault: Extra inputs are not permitted"),
    ({"T": {"keyvault": "no-slash"}}, {}, "'T': keyvault: 'no-slash': use"),
    ({"T": {"keyvault": "http://v.vault.azure.net/secrets/a"}}, {}, "is not a Key Vault secret URL"),
    ({"T": None}, {}, "'T': a secret is a value, or one of"),
    ({"T": "x" * (64 * 1024 + 1)}, {}, "'T': the value is over 64 KiB"),
    ({f"T{i}": "x" * (60 * 1024) for i in range(5)}, {}, "bytes in all; at most 256 KiB"),
])
def test_bad_secrets_are_refused_naming_them(secrets, environment, words):
    with pytest.raises(ValueError) as err:
        spec(secrets=secrets, environment=environment)
    assert words in str(err.value)


def test_keyvault_references():
    assert parse_keyvault("myvault/db-pass") == ("https://myvault.vault.azure.net", "db-pass", None)
    assert parse_keyvault("myvault/db-pass/0a1b") == ("https://myvault.vault.azure.net", "db-pass", "0a1b")
    assert parse_keyvault("https://kv1.vault.azure.cn/secrets/x/v2") == ("https://kv1.vault.azure.cn", "x", "v2")
    for url in ("https://evil.example.com/secrets/x", "https://kv1.vault.azure.net:8443/secrets/x",
                "https://u:p@kv1.vault.azure.net/secrets/x", "https://v1.vault.azure.net/secrets/x"):
        with pytest.raises(ValueError, match="not a Key Vault host"):  # the server calls it with its identity
            parse_keyvault(url)


def test_env_and_file_references_are_read_at_submit_relative_to_the_job_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "token.txt").write_text("from-a-file-9d8c\n")  # echo's newline is not the secret's
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "s", "command": "true", "secrets": {
        "FROM_ENV": {"env": "RB_TEST_SECRET_SRC"}, "FROM_FILE": {"file": "conf/token.txt"},
        "KV": {"keyvault": "myvault/k"}}}))
    monkeypatch.setenv("RB_TEST_SECRET_SRC", "from-the-env-1c2b")
    monkeypatch.chdir("/")  # relative to the job file, not to where submit runs
    s = load_job_file(job)
    assert s.secrets["FROM_ENV"].get_secret_value() == "from-the-env-1c2b"
    assert s.secrets["FROM_FILE"].get_secret_value() == "from-a-file-9d8c"
    assert s.secrets["KV"] == SecretRef(keyvault="myvault/k")  # the server reads it
    # what the SDK sends: the values beside the spec, which names them only
    body = SubmitRequest(spec=s, secrets={"FROM_ENV": SecretStr("from-the-env-1c2b")}).wire()
    assert body["spec"]["secrets"]["FROM_ENV"] == MASK and body["secrets"] == {"FROM_ENV": "from-the-env-1c2b"}
    assert "from-the-env-1c2b" not in SubmitRequest(spec=s).model_dump_json()

    monkeypatch.delenv("RB_TEST_SECRET_SRC")
    with pytest.raises(SpecError) as err:
        load_job_file(job)
    assert "secrets.FROM_ENV: {env: RB_TEST_SECRET_SRC}: RB_TEST_SECRET_SRC is not set" in str(err.value)
    monkeypatch.setenv("RB_TEST_SECRET_SRC", "x")
    (tmp_path / "conf" / "token.txt").unlink()
    with pytest.raises(SpecError) as err:
        load_job_file(job)
    assert "secrets.FROM_FILE: {file: conf/token.txt}: No such file or directory" in str(err.value)


def test_the_server_takes_values_beside_the_spec_only_for_names_it_has():
    s = JobSpec.model_validate_json(spec(secrets={"A": VALUE, "KV": {"keyvault": "v1x/k"}}).model_dump_json())
    assert rs.split_for_store(s, {"A": VALUE}) == ({"A": VALUE}, None)
    assert "secrets.A: no value was sent" in rs.split_for_store(s, {})[1]
    assert "values were sent for B, which the job does not name" in rs.split_for_store(s, {"A": "x", "B": "y"})[1]
    raw = spec(secrets={"E": {"env": "HOME"}})  # an API caller that did not read its reference
    assert "secrets.E: {'env': 'HOME'} is read by the client at submit" in rs.split_for_store(raw, {})[1]


# ---- at rest -------------------------------------------------------------------------------
def test_values_are_encrypted_at_rest_and_the_key_file_is_private(tmp_path):
    box = rs.SecretBox(tmp_path)
    store = Store(tmp_path / "raybatch.db")
    s = spec(secrets={"API_KEY": VALUE})
    store.create_job(name="s", experiment="e", priority=500, spec=s.model_dump(mode="json"),
                     job_dir_for=lambda i: tmp_path / i, secrets=box.seal(rs.values(s.secrets)))
    key = tmp_path / rs.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".secrets.key-")]  # no temp file left
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("raybatch.db*"))  # the file, its WAL
    assert VALUE.encode() not in raw and b"API_KEY" in raw
    row = store.list_jobs()[0]
    assert VALUE not in row["spec"] and VALUE not in row["secrets"]
    assert rs.attempt_values(JobSpec.model_validate_json(row["spec"]), row["secrets"], box) == {"API_KEY": VALUE}
    # another server process (the key exists now) opens what this one sealed
    assert rs.SecretBox(tmp_path).open(row["secrets"]) == {"API_KEY": VALUE}
    store.close()

    key.chmod(0o644)  # readable by others: not used
    with pytest.raises(rs.SecretError, match="must be the server user's alone"):
        rs.SecretBox(tmp_path).seal({"A": "b"})
    key.unlink()  # a new key: what the old one sealed cannot be opened, and the job says so
    with pytest.raises(rs.SecretError, match="cannot be decrypted"):
        rs.SecretBox(tmp_path).open(row["secrets"])


def test_concurrent_first_use_makes_one_key(tmp_path):
    boxes = [rs.SecretBox(tmp_path) for _ in range(8)]
    sealed: list[str] = [""] * 8
    threads = [threading.Thread(target=lambda i=i: sealed.__setitem__(i, boxes[i].seal({"A": "v"})))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(rs.SecretBox(tmp_path).open(x) == {"A": "v"} for x in sealed)


def test_keyvault_is_read_by_the_server_with_its_identity(monkeypatch):
    """Key Vault cannot be reached from here: only SecretClient.get_secret, the network
    call, is replaced; parsing, the client, the credential and the errors are the real ones."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.keyvault.secrets import KeyVaultSecret, SecretClient, SecretProperties

    calls = []

    def get_secret(self, name, version=None, **kw):
        calls.append((self.vault_url, name, version))
        if name == "gone":
            raise ResourceNotFoundError("(SecretNotFound) A secret with (name/id) gone was not found in this key vault.")
        return KeyVaultSecret(SecretProperties(), "from-key-vault-5e6f")

    monkeypatch.setattr(SecretClient, "get_secret", get_secret)
    s = JobSpec.model_validate_json(spec(secrets={
        "KV": {"keyvault": "myvault/db-pass"},
        "URL": {"keyvault": "https://other.vault.azure.net/secrets/api/0a1b2c"}}).model_dump_json())
    assert rs.attempt_values(s, None, rs.SecretBox("/nonexistent")) == {"KV": "from-key-vault-5e6f",
                                                                         "URL": "from-key-vault-5e6f"}
    assert calls == [("https://myvault.vault.azure.net", "db-pass", None),
                     ("https://other.vault.azure.net", "api", "0a1b2c")]
    gone = JobSpec.model_validate_json(spec(secrets={"G": {"keyvault": "myvault/gone"}}).model_dump_json())
    with pytest.raises(rs.SecretError) as err:
        rs.attempt_values(gone, None, rs.SecretBox("/nonexistent"))
    assert "secrets.G: Key Vault https://myvault.vault.azure.net, secret 'gone': ResourceNotFoundError" in str(err.value)


def test_a_vault_taken_from_the_workspace_after_submit_is_refused_at_start_and_never_read():
    """key_vaults is checked at submit (the API) and again before each start's read, with
    the policy as it is then: a vault an admin took from the workspace while the job was
    queued is refused, naming it, and Key Vault is not called."""
    from raybatch.spec.policy import SchedulerPolicy

    s = JobSpec.model_validate_json(spec(workspace="nlp", secrets={"KV": {"keyvault": "nlpvault/db"}}).model_dump_json())
    reads = []

    def read(ref):
        reads.append(ref)
        return "from-key-vault"

    def at_start(policy):
        return rs.attempt_values(s, None, rs.SecretBox("/nonexistent"), read_keyvault=read,
                                 vault_problem=lambda vault: policy.vault_problem(s.workspace, vault))

    assert at_start(SchedulerPolicy.model_validate({"key_vaults": {"nlp": ["NLPVault"]}})) == {"KV": "from-key-vault"}
    with pytest.raises(rs.SecretError) as err:
        at_start(SchedulerPolicy.model_validate({"key_vaults": {"nlp": ["othervault"]}}))
    assert "secrets.KV: Key Vault 'nlpvault' is not one of workspace 'nlp''s (othervault" in str(err.value)
    with pytest.raises(rs.SecretError, match="workspace 'nlp' may name no Key Vault"):
        at_start(SchedulerPolicy.model_validate({}))
    assert reads == ["nlpvault/db"]


# ---- output --------------------------------------------------------------------------------
def test_masker_replaces_values_split_anywhere():
    values = [VALUE, "line-one-of-a-key\nline-two-of-a-key", "abc"]
    text = (f"x {VALUE} y {VALUE[:5]} z\n{VALUE}{VALUE}\nline-two-of-a-key alone\n"
            "line-one-of-a-key\nline-two-of-a-key\nabc stays\n").encode()
    want = (b"x *** y " + VALUE[:5].encode() + b" z\n******\n*** alone\n***\n***\nabc stays\n")
    rnd = random.Random(7)
    for _ in range(300):
        m, out, i = rs.Masker(values), b"", 0
        while i < len(text):
            j = i + rnd.randint(1, 12)
            out += m.feed(text[i:j])
            i = j
        assert out + m.flush() == want


def test_the_rank_tee_masks_the_file_and_the_mirror(tmp_path):
    """A real pipe, written in pieces that split the value, through the rank actor's tee."""
    r, w = os.pipe()
    mirror = io.BytesIO()
    src = os.fdopen(r, "rb", buffering=0)
    lines: list[bytes] = []
    t = threading.Thread(target=_tee, args=(src, tmp_path / "stdout.txt", mirror, [0.0], lines.append,
                                            rs.Masker([VALUE])))
    t.start()
    for piece in (b"token=", VALUE[:9].encode(), VALUE[9:].encode() + b" ok\n", b"tail ", VALUE[:4].encode()):
        os.write(w, piece)
    os.close(w)
    t.join(10)
    written = (tmp_path / "stdout.txt").read_bytes()
    assert written == b"token=*** ok\ntail " + VALUE[:4].encode()  # the held end is written at EOF
    assert mirror.getvalue() == written and lines == [b"token=*** ok", b"tail " + VALUE[:4].encode()]
