"""The cluster configs in cluster_configs/: Ray accepts them (``prepare_config`` +
``validate_config``, as ``ray up`` runs them) and raybatch's lints find nothing but the
subscription placeholder a user must replace; each lint rule family catches its broken
field, and the Azure-only rules leave a fake_multinode config alone.

Nothing here talks to Azure (Azure Resource Manager cannot be reached from here); the
ARM-facing code is tested against a fake ARM in tests/test_azure_provider.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from raybatch.cluster import configs
from raybatch.scheduler.fit import is_spot_type

ROOT = Path(__file__).resolve().parents[1] / "cluster_configs"
NOT_RAY = {"mounts.example.yaml", "kuberay-aks.yaml"}  # not Ray autoscaler configs
RAY_CONFIGS = sorted(p for p in ROOT.glob("*.yaml") if p.name not in NOT_RAY)
AZURE = ["azure-cpu.yaml", "azure-gpu.yaml", "azure-spot.yaml"]
SUB = "11111111-2222-3333-4444-555555555555"


def ray_check(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def azure(name: str = "azure-spot.yaml") -> dict:
    c = configs.load(ROOT / name)
    c["provider"]["subscription_id"] = SUB
    return c


def fake_multinode() -> dict:
    """A fake_multinode config of the shape tests/fake_autoscaling.py starts, with
    raybatch's resources: the rules for every provider apply, the Azure ones do not."""
    return {
        "cluster_name": "fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "external", "disable_node_updaters": True, "use_node_id_as_ip": True,
                     "disable_launch_config_check": True,
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0, "raybatch_trial": 1000}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 2, "rb_type_cpu": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": 2},
            "spot": {"resources": {"CPU": 2, "rb_type_spot": 1, "raybatch_low_priority": 1},
                     "labels": {"raybatch.io/low-priority": "true"}, "node_config": {}, "min_workers": 0,
                     "max_workers": 2},
        },
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{k: [] for k in configs.COMMAND_LISTS},
    }


def test_the_azure_configs_exist():
    names = {p.name for p in RAY_CONFIGS}
    assert set(AZURE) <= names


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_every_config(path):
    prepared = ray_check(configs.load(path))
    for name, t in prepared["available_node_types"].items():
        assert t["max_workers"] >= t["min_workers"] >= 0, name


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_lint_finds_only_the_placeholder(path):
    c = configs.load(path)
    found = configs.lint(c, path.name)
    if configs.is_azure(c):
        # the committed file carries a placeholder the user must replace, and the lint says so
        assert found == [f"{path.name}: provider subscription_id: still the placeholder "
                         f"{configs.SUBSCRIPTION_PLACEHOLDER}: set your subscription's id "
                         "(az account show --query id -o tsv)"]
        c["provider"]["subscription_id"] = SUB
        assert configs.lint(c, path.name) == []
    else:
        assert found == []


def test_azure_configs_use_raybatchs_provider_and_ray_2_60():
    for name in AZURE:
        c = configs.load(ROOT / name)
        assert c["provider"]["module"] == configs.PROVIDER_MODULE
        commands = [x for k in configs.COMMAND_LISTS for x in c[k]]
        assert not any("ray-3.0.0.dev0" in x for x in commands)
        assert 'pip install -q "ray[default]==2.60.0"' in c["setup_commands"]
        for t in c["available_node_types"].values():
            assert t["node_config"]["azure_arm_parameters"]["imageOffer"] == "ubuntu-hpc"


def test_gpu_config_has_the_three_sizes_with_their_gpus():
    c = configs.load(ROOT / "azure-gpu.yaml")
    sizes = {t["node_config"]["azure_arm_parameters"]["vmSize"]: t["resources"]
             for n, t in c["available_node_types"].items() if n != c["head_node_type"]}
    assert {s: r["GPU"] for s, r in sizes.items()} == {
        "Standard_NC4as_T4_v3": 1, "Standard_NC24ads_A100_v4": 1, "Standard_ND96asr_v4": 8}
    assert {s: r["CPU"] for s, r in sizes.items()} == {
        "Standard_NC4as_T4_v3": 4, "Standard_NC24ads_A100_v4": 24, "Standard_ND96asr_v4": 96}


def test_spot_config_one_size_dedicated_and_spot():
    c = configs.load(ROOT / "azure-spot.yaml")
    workers = {n: t for n, t in c["available_node_types"].items() if n != c["head_node_type"]}
    assert len({t["node_config"]["azure_arm_parameters"]["vmSize"] for t in workers.values()}) == 1
    spot = [t for t in workers.values() if is_spot_type(t)]
    assert len(spot) == 1 and len(workers) == 2
    arm = spot[0]["node_config"]["azure_arm_parameters"]
    assert (arm["priority"], arm["evictionPolicy"], arm["billingProfile"]) == ("Spot", "Delete", {"maxPrice": -1})


def test_the_fake_multinode_shape_lints_clean_and_ray_accepts_it():
    ray_check(fake_multinode())
    assert configs.lint(fake_multinode(), "fake") == []


def test_load_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.yaml: cannot read"):
        configs.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML at line \d+"):
        configs.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: a cluster config is a YAML mapping .* got list"):
        configs.load(bad)


# --------------------------------------------------------------------- the rules, one family each

def _set(path: str):
    """A mutation: set a dotted path (list indexes as numbers) to a value, or delete it (...)."""
    def apply(c: dict, value) -> None:
        keys = path.split("|")
        node = c
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return apply


T = "available_node_types"
BROKEN = [
    # (what, mutation path, value, the line's start after "<source>: ")
    ("a command list left out", "worker_setup_commands", ..., "cluster worker_setup_commands: missing"),
    ("a command list not a list", "initialization_commands", "echo hi", "cluster initialization_commands: must be a list"),
    ("head runs jobs", f"{T}|head|resources|CPU", 2, "head resources.CPU: the head must declare CPU: 0"),
    ("no trial resource", f"{T}|head|resources|raybatch_trial", ..., "head resources.raybatch_trial:"),
    ("fractional resource", f"{T}|cpu_dedicated|resources|CPU", 15.5, "cpu_dedicated resources.CPU: must be an integer"),
    ("no marker", f"{T}|cpu_dedicated|resources|rb_type_cpu_dedicated", ..., "cpu_dedicated resources.rb_type_cpu_dedicated:"),
    ("another type's marker", f"{T}|cpu_dedicated|resources|rb_type_cpu_spot", 1, "cpu_dedicated resources.rb_type_cpu_spot: marker of another type"),
    ("no min_workers", f"{T}|cpu_spot|min_workers", ..., "cpu_spot min_workers: must be set"),
    ("min above max", f"{T}|cpu_spot|min_workers", 9, "cpu_spot min_workers: larger than max_workers (9 > 8)"),
    ("spot without the resource", f"{T}|cpu_spot|resources|raybatch_low_priority", ..., "cpu_spot resources.raybatch_low_priority:"),
    ("spot without the label", f"{T}|cpu_spot|labels", ..., "cpu_spot labels.raybatch.io/low-priority:"),
    ("label not a string", f"{T}|cpu_spot|labels|raybatch.io/low-priority", True, "cpu_spot labels.raybatch.io/low-priority:"),
    ("no idle timeout", "idle_timeout_minutes", ..., "cluster idle_timeout_minutes:"),
    ("no global max_workers", "max_workers", ..., "cluster max_workers:"),
    ("Ray's own azure provider", "provider|type", "azure", "provider module: use raybatch's provider subclass"),
    ("not a subscription id", "provider|subscription_id", "my-sub", "provider subscription_id: must be a subscription id"),
    ("no resource group", "provider|resource_group", ..., "provider resource_group: must be set"),
    ("stopped nodes cached", "provider|cache_stopped_nodes", True, "provider cache_stopped_nodes: must be false"),
    ("public IPs on workers", "provider|use_internal_ips", ..., "provider use_internal_ips: must be true"),
    ("head not reachable", "provider|use_external_head_ip", False, "provider use_external_head_ip: must be true"),
    ("one ssh key", "auth|ssh_public_key", ..., "auth ssh_public_key: must be set"),
    ("no vm size", f"{T}|cpu_dedicated|node_config|azure_arm_parameters|vmSize", ..., "cpu_dedicated node_config.azure_arm_parameters.vmSize:"),
    ("no image", f"{T}|cpu_dedicated|node_config|azure_arm_parameters|imageOffer", ..., "cpu_dedicated node_config.azure_arm_parameters: no image"),
    ("spot deallocated", f"{T}|cpu_spot|node_config|azure_arm_parameters|evictionPolicy", "Deallocate", "cpu_spot node_config.azure_arm_parameters.evictionPolicy: a Spot type needs Delete"),
    ("spot without price", f"{T}|cpu_spot|node_config|azure_arm_parameters|billingProfile", ..., "cpu_spot node_config.azure_arm_parameters.billingProfile.maxPrice:"),
    ("marked spot, regular VMs", f"{T}|cpu_spot|node_config|azure_arm_parameters|priority", "Regular", "cpu_spot node_config.azure_arm_parameters.priority: the type is marked low-priority"),
    ("no token mount", "file_mounts|~/.ray/auth_token", ..., "cluster file_mounts.~/.ray/auth_token: must be"),
    ("wheel mount elsewhere", "file_mounts|~/raybatch-setup", "/tmp/node", "cluster file_mounts.~/raybatch-setup: must be"),
    ("ray not pinned", "setup_commands|3", 'pip install -q "ray[default]"', "cluster setup_commands: must pip install ray[default]==2.60.0"),
    ("no wheel", "setup_commands|4", "true", "cluster setup_commands: must pip install the raybatch wheel"),
    ("no node-setup", "setup_commands|5", "true", "cluster setup_commands: must run `raybatch node-setup --mounts"),
    ("nightly ray", "head_setup_commands", ["pip install ray-3.0.0.dev0-cp310.whl"], "cluster commands: install a nightly Ray wheel"),
    ("head without token auth", "head_start_ray_commands|1", "ray start --head --autoscaling-config=~/ray_bootstrap_config.yaml", "cluster head_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE=token"),
    ("worker without token auth", "worker_start_ray_commands|1", "ray start --address=$RAY_HEAD_IP:6379", "cluster worker_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE=token"),
    ("head without autoscaler", "head_start_ray_commands|1", "RAY_AUTH_MODE=token ray start --head", "cluster head_start_ray_commands[1]: the head's `ray start --head` needs --autoscaling-config"),
    ("no head-setup", "head_start_ray_commands|2", "true", "cluster head_start_ray_commands: must run `raybatch cluster head-setup"),
    # the server's TLS key stays on the head: file_mounts reach every worker
    ("TLS key directory mounted", "file_mounts|~/raybatch-tls", "{render_dir}/tls", "cluster file_mounts.~/raybatch-tls: ships the server's TLS key directory ('{render_dir}/tls'): file_mounts copy to every node, workers included, and the key must stay on the head"),
    ("TLS key mounted elsewhere", "file_mounts|~/certs", "{render_dir}/tls", "cluster file_mounts.~/certs: ships the server's TLS key directory"),
    ("a key file mounted", "file_mounts|~/x/server.key", "/home/me/server.key", "cluster file_mounts.~/x/server.key: ships the server's TLS key"),
    ("server without TLS", "head_start_ray_commands|2", "raybatch cluster head-setup --state-dir /mnt/raybatch-state "
     "--cluster-config ~/ray_bootstrap_config.yaml", "cluster head_start_ray_commands: must run `raybatch cluster "
     "head-setup --state-dir /mnt/raybatch-state --cluster-config ~/ray_bootstrap_config.yaml --tls-cert "
     "~/raybatch-tls/server.pem --tls-key ~/raybatch-tls/server.key`"),
    ("no spot-watch", "worker_start_ray_commands|2", "true", "cluster worker_start_ray_commands: spot types need `raybatch spot-watch"),
    ("spot-watch on every node", "worker_start_ray_commands|2", "nohup raybatch spot-watch --gcs-address $RAY_HEAD_IP:6379 &", "cluster worker_start_ray_commands[2]: start spot-watch only on spot nodes"),
]


@pytest.mark.parametrize("what,path,value,line", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_rule_catches_its_field(what, path, value, line):
    c = azure("azure-spot.yaml")
    assert configs.lint(c, "spot.yaml") == []
    _set(path)(c, value)
    found = configs.lint(c, "spot.yaml")
    assert len(found) == 1 and found[0].startswith(f"spot.yaml: {line}"), found


def test_lines_say_what_is_allowed():
    c = azure("azure-spot.yaml")
    c[T]["cpu_spot"]["node_config"]["azure_arm_parameters"]["billingProfile"] = {"maxPrice": 0}
    c[T]["cpu_dedicated"]["resources"]["GPU"] = -1
    found = configs.lint(c, "s")
    assert any("-1 (up to the pay-as-you-go price" in f and "got 0" in f for f in found), found
    assert any("cpu_dedicated resources.GPU: must be an integer >= 0, got -1" in f for f in found), found


def test_head_type_must_exist():
    c = azure("azure-cpu.yaml")
    c["head_node_type"] = "nope"
    # (and the head type, now a worker type, lacks a marker)
    assert configs.lint(c, "x")[0] == ("x: cluster head_node_type: 'nope' is not one of available_node_types "
                                       "(head, cpu_d16, cpu_d64)")


def test_azure_rules_do_not_apply_to_fake_multinode_but_the_others_do():
    c = fake_multinode()
    assert not configs.is_azure(c)
    # nothing Azure is asked of it: no subscription, file_mounts, ssh keys, setup commands
    assert configs.lint(c, "fake") == []
    c[T]["head"]["resources"]["CPU"] = 1
    del c[T]["cpu"]["resources"]["rb_type_cpu"]
    del c[T]["spot"]["labels"]
    del c["worker_start_ray_commands"]
    found = configs.lint(c, "fake")
    assert [f.split(":")[1].strip() for f in found] == [
        "cluster worker_start_ray_commands", "head resources.CPU", "cpu resources.rb_type_cpu",
        "spot labels.raybatch.io/low-priority"], found


def test_lint_of_something_else():
    assert configs.lint([], "x") == ["x: cluster: not a mapping (a Ray cluster config is a YAML mapping)"]
    assert configs.lint({**fake_multinode(), T: {}}, "x")[-1].startswith("x: cluster available_node_types: missing")


def test_spot_watch_guard_matches_what_ray_exports():
    """The spot-watch line tests RAY_OVERRIDE_LABELS as Ray's command runner exports it."""
    from ray.autoscaler._private.command_runner import _with_environment_variables

    c = configs.load(ROOT / "azure-spot.yaml")
    line = next(x for x in c["worker_start_ray_commands"] if configs.SPOT_WATCH in x)
    exported = _with_environment_variables("true", {"RAY_OVERRIDE_LABELS": {"raybatch.io/low-priority": "true"}})
    import shlex
    import subprocess

    probe = line.replace("nohup raybatch spot-watch", "echo WATCH").split(">>")[0] + ";; esac"
    for env, expect in ((exported, "WATCH"), (_with_environment_variables("true", {"RAY_OVERRIDE_LABELS": {}}), "")):
        out = subprocess.run(["bash", "-c", env.removesuffix("true") + probe], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.4"}, timeout=10)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().startswith(expect) and (expect or not out.stdout.strip()), (shlex.quote(probe), out)


def test_committed_yaml_round_trips_through_the_loader(tmp_path):
    c = azure("azure-gpu.yaml")
    p = tmp_path / "rendered.yaml"
    p.write_text(yaml.safe_dump(c))
    assert configs.lint(configs.load(p), "r") == []


def test_mounts_example_is_batch_ai_mount_volumes_and_node_setup_reads_it():
    doc = yaml.safe_load((ROOT / "mounts.example.yaml").read_text())
    volumes = doc["mountVolumes"]
    assert set(volumes) == {"root", "azureFileShares", "azureBlobFileSystems", "unmanagedFileSystems"}
    assert set(volumes["azureFileShares"][0]) == {"accountName", "azureFileUrl", "relativeMountPath",
                                                  "credentials", "directoryMode", "fileMode"}
    from raybatch.cluster import mounts  # node-setup's parser

    parsed = mounts.load(ROOT / "mounts.example.yaml")
    assert [parsed.path(m) for m in parsed.azureFileShares + parsed.azureBlobFileSystems
            + parsed.unmanagedFileSystems] == ["/mnt/raybatch/afs", "/mnt/raybatch/datasets", "/mnt/raybatch/nfs"]


SPOT_CASES = [
    ({"node_config": {"azure_arm_parameters": {"priority": "Spot"}}}, True),
    ({"node_config": {"azure_arm_parameters": {"priority": "spot"}}}, True),
    ({"node_config": {"azure_arm_parameters": {"priority": "Low"}}}, True),   # the older name
    ({"node_config": {"azure_arm_parameters": {"priority": "Regular"}}}, False),
    ({"resources": {"raybatch_low_priority": 1}}, True),
    ({"resources": {"raybatch_low_priority": 0}}, False),
    ({"labels": {"raybatch.io/low-priority": "true"}}, True),
    ({"labels": {"raybatch.io/low-priority": "True"}}, True),
    ({"labels": {"raybatch.io/low-priority": "false"}}, False),
    ({}, False),
]


@pytest.mark.parametrize("extra,spot", SPOT_CASES)
def test_one_spot_rule_for_the_lint_the_node_records_the_demand_and_the_preflight(extra, spot):
    """Azure's priority Spot/Low (any case), the resource or the label: spot, wherever asked."""
    from raybatch.cluster import preflight
    from raybatch.scheduler.autoscale import NodeTypes
    from raybatch.scheduler.nodes import type_facts

    t = {"min_workers": 0, "max_workers": 1, "resources": {"CPU": 2}, **copy.deepcopy(extra)}
    t["resources"] = {"CPU": 2, **t["resources"]}
    t.setdefault("node_config", {}).setdefault("azure_arm_parameters", {})["vmSize"] = "Standard_D2s_v5"
    config = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "node_config": {"azure_arm_parameters": {"vmSize": "Standard_D2s_v5"}}},
        "w": t}}
    assert is_spot_type(t) is spot
    assert type_facts(config)["w"] == ("Standard_D2s_v5", spot)
    assert NodeTypes.from_config(config).types["w"].spot is spot
    assert next(n for n in preflight.node_types(config)[0] if n.name == "w").spot is spot
    # the lint's own rule: a spot type carries both marks
    problems = configs.lint(config)
    needs_marks = [p for p in problems if "a low-priority (spot) type needs" in p]
    assert bool(needs_marks) is (spot and not ("resources" in extra and "labels" in extra))
