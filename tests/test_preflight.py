"""Pre-flight checks (raybatch.cluster.preflight, ``raybatch cluster check``) against a fake
Azure Resource Manager: ARM cannot be reached from here, so the real azure-mgmt clients talk
to tests/fake_arm.py (a requests adapter behind azure-core's RequestsTransport; nothing leaves
the process), which answers with resource SKUs, usages and images in the shape of Azure's
REST reference. One test per verdict, and the CLI in-process with the fake injected."""

from __future__ import annotations

import copy
import functools
import json
import sys

import pytest
from typer.testing import CliRunner

from raybatch.cluster import preflight
from tests.fake_arm import SUBSCRIPTION, FakeArm, FakeCredential

LOCATION = "eastus"
HPC = ("microsoft-dsvm", "ubuntu-hpc", "2204")
JAMMY_GEN1 = ("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts")


def sku(name, family, vcpus, gpus=0, gens="V1,V2", low_priority=True, zones=("1", "2", "3"), restrictions=()):
    """A resource SKU as GET /providers/Microsoft.Compute/skus lists it."""
    caps = [{"name": "vCPUs", "value": str(vcpus)}, {"name": "HyperVGenerations", "value": gens},
            {"name": "LowPriorityCapable", "value": "True" if low_priority else "False"},
            {"name": "MemoryGB", "value": str(vcpus * 4)}]
    if gpus:
        caps.append({"name": "GPUs", "value": str(gpus)})
    return {"resourceType": "virtualMachines", "name": name, "tier": "Standard", "size": name.split("_", 1)[1],
            "family": family, "locations": [LOCATION],
            "locationInfo": [{"location": LOCATION, "zones": list(zones), "zoneDetails": []}],
            "capabilities": caps, "restrictions": list(restrictions)}


def restriction(kind, zones=()):
    info = {"locations": [LOCATION]} if kind == "Location" else {"locations": [LOCATION], "zones": list(zones)}
    return {"type": kind, "values": [LOCATION], "restrictionInfo": info, "reasonCode": "NotAvailableForSubscription"}


def usage(name, limit, current=0, localized=None):
    return {"name": {"value": name, "localizedValue": localized or name}, "currentValue": current,
            "limit": limit, "unit": "Count"}


def default_skus():
    return [
        sku("Standard_D4s_v3", "standardDSv3Family", 4),
        sku("Standard_NC4as_T4_v3", "standardNCASv3_T4Family", 4, gpus=1),
        sku("Standard_ND96asr_v4", "standardNDASv4_A100Family", 96, gpus=8, gens="V2", low_priority=False),
        # another resource type of the same name must not be taken for the VM size
        {"resourceType": "disks", "name": "Standard_D4s_v3", "locations": [LOCATION], "capabilities": []},
    ]


def default_usages():
    return [usage("cores", 1000, localized="Total Regional vCPUs"), usage("standardDSv3Family", 100),
            usage("standardNCASv3_T4Family", 100), usage("standardNDASv4_A100Family", 200),
            usage("lowPriorityCores", 100, localized="Total Regional Low-priority vCPUs")]


def make_arm(skus=None, usages=None, rg_exists=True, images=None) -> FakeArm:
    """images: {(publisher, offer, sku): {version: generation}}."""
    arm = FakeArm()
    arm.route("GET", r"/providers/Microsoft.Compute/skus$", {"value": default_skus() if skus is None else skus})
    arm.route("GET", rf"/locations/{LOCATION}/usages$", {"value": default_usages() if usages is None else usages})
    arm.route("HEAD", r"/resourcegroups/[^/]+$", None, status=204 if rg_exists else 404)
    images = {HPC: {"2204.2024.0101": "V2", "2204.2025.0301": "V2"},
              JAMMY_GEN1: {"22.04.202401010": "V1", "22.04.202501010": "V1"}} if images is None else images
    for (pub, offer, sk), versions in images.items():
        base = rf"/locations/{LOCATION}/publishers/{pub}/artifacttypes/vmimage/offers/{offer}/skus/{sk}/versions"
        arm.route("GET", base + "$", [{"name": v, "location": LOCATION, "id": f"/x/{v}"} for v in versions])
        for v, gen in versions.items():
            arm.route("GET", base + f"/{v}$", {"name": v, "location": LOCATION, "id": f"/x/{v}",
                                               "properties": {"hyperVGeneration": gen, "osImage": {
                                                   "operatingSystem": "Linux"}}})
    return arm


def worker(size, cpus, gpus=None, min_workers=0, max_workers=2, spot=False, image=HPC, **params):
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus is not None else {})}
    arm_params = {"vmSize": size, "imagePublisher": image[0], "imageOffer": image[1], "imageSku": image[2],
                  "imageVersion": "latest", **params}
    if spot:
        arm_params.update(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
    return {"min_workers": min_workers, "max_workers": max_workers, "resources": resources,
            "node_config": {"azure_arm_parameters": arm_params}}


def base_config() -> dict:
    return {
        "cluster_name": "rb",
        "max_workers": 10,
        "provider": {"type": "azure", "location": LOCATION, "resource_group": "rb-rg",
                     "subscription_id": SUBSCRIPTION, "cache_stopped_nodes": False},
        "head_node_type": "ray.head",
        "available_node_types": {
            "ray.head": worker("Standard_D4s_v3", 0, max_workers=0),
            "ray.worker.cpu": worker("Standard_D4s_v3", 4, min_workers=1, max_workers=4),
            "ray.worker.gpu": worker("Standard_NC4as_T4_v3", 4, gpus=1, max_workers=2),
            "ray.worker.spot": worker("Standard_NC4as_T4_v3", 4, gpus=1, max_workers=2, spot=True),
        },
    }


def run_check(config, arm=None, credential=None, az=True):
    arm = arm or make_arm()
    return preflight.check(config, credential=credential or FakeCredential(), transport=arm.transport(),
                           az_logged_in=az), arm


def only(problems, level=None):
    assert len(problems) == 1, [str(p) for p in problems]
    if level:
        assert problems[0].level == level, str(problems[0])
    return problems[0]


def test_all_good_is_no_problem_and_asks_arm_the_documented_questions():
    cred = FakeCredential()
    problems, arm = run_check(base_config(), credential=cred)
    assert problems == []
    assert cred.scopes[0] == ("https://management.azure.com/.default",)
    (skus,) = arm.requests_to("GET", r"/providers/Microsoft.Compute/skus$")
    assert skus.query["$filter"] == [f"location eq '{LOCATION}'"]
    assert skus.path == f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/skus"
    assert len(arm.requests_to("GET", rf"/locations/{LOCATION}/usages$")) == 1
    assert arm.requests_to("HEAD", r"/resourcegroups/rb-rg$")
    # "latest": the image's versions listed once, the highest one read for its generation
    assert len(arm.requests_to("GET", r"/skus/2204/versions$")) == 1
    assert [s.path.rsplit("/", 1)[1] for s in arm.requests_to("GET", r"/skus/2204/versions/[^/]+$")] == \
        ["2204.2025.0301"]


def test_size_missing_in_location():
    config = base_config()
    config["available_node_types"]["ray.worker.cpu"]["node_config"]["azure_arm_parameters"]["vmSize"] = \
        "Standard_D4s_v9"
    p = only(run_check(config)[0], "error")
    assert (p.node_type, p.field) == ("ray.worker.cpu", "vmSize")
    assert str(p) == "ray.worker.cpu vmSize: Standard_D4s_v9 is not a VM size offered in eastus"


def test_not_available_for_subscription_in_location():
    skus = default_skus()
    skus[1] = sku("Standard_NC4as_T4_v3", "standardNCASv3_T4Family", 4, gpus=1,
                  restrictions=[restriction("Location")])
    problems, _ = run_check(base_config(), make_arm(skus=skus))
    assert {(p.node_type, p.field, p.level) for p in problems} == {
        ("ray.worker.gpu", "vmSize", "error"), ("ray.worker.spot", "vmSize", "error")}
    assert "NotAvailableForSubscription, type Location" in str(problems[0])


def test_not_available_for_subscription_in_a_zone():
    skus = default_skus()
    skus[0] = sku("Standard_D4s_v3", "standardDSv3Family", 4, restrictions=[restriction("Zone", ["2"])])
    problems, _ = run_check(base_config(), make_arm(skus=skus))
    # Ray spreads VMs over every zone of the size unless availability_zone says otherwise
    assert {p.node_type for p in problems} == {"ray.head", "ray.worker.cpu"}
    p = problems[0]
    assert p.level == "error" and "zone(s) 2 of eastus" in p.message and 'availability_zone: "1,3"' in p.message
    # zones that avoid the restricted one, or no zone at all: fine
    config = base_config()
    for t, zone in (("ray.head", "1,3"), ("ray.worker.cpu", "none")):
        config["available_node_types"][t]["node_config"]["azure_arm_parameters"]["availability_zone"] = zone
    assert run_check(config, make_arm(skus=skus))[0] == []


def test_spot_type_on_a_size_that_is_not_low_priority_capable():
    skus = default_skus()
    skus[1] = sku("Standard_NC4as_T4_v3", "standardNCASv3_T4Family", 4, gpus=1, low_priority=False)
    p = only(run_check(base_config(), make_arm(skus=skus))[0], "error")
    assert (p.node_type, p.field) == ("ray.worker.spot", "priority")
    assert "not LowPriorityCapable" in p.message


def test_declared_cpus_and_gpus_against_the_size():
    config = base_config()
    types = config["available_node_types"]
    types["ray.worker.cpu"]["resources"]["CPU"] = 8      # more than the 4 vCPUs: error
    types["ray.worker.gpu"]["resources"]["GPU"] = 2      # more than the 1 GPU: error
    types["ray.worker.spot"]["resources"]["CPU"] = 2     # fewer: warning
    problems = {(p.node_type, p.field): p for p in run_check(config)[0]}
    assert set(problems) == {("ray.worker.cpu", "resources.CPU"), ("ray.worker.gpu", "resources.GPU"),
                             ("ray.worker.spot", "resources.CPU")}
    assert problems["ray.worker.cpu", "resources.CPU"].level == "error"
    assert str(problems["ray.worker.cpu", "resources.CPU"]) == \
        "ray.worker.cpu resources.CPU: 8 declared but Standard_D4s_v3 has 4 vCPUs"
    assert problems["ray.worker.gpu", "resources.GPU"].level == "error"
    assert problems["ray.worker.spot", "resources.CPU"].level == "warning"
    # the head's CPU: 0 keeps work off the head: not a problem (base config has it)


def test_gen1_image_on_a_gen2_only_size():
    config = base_config()
    config["available_node_types"]["ray.worker.a100"] = worker("Standard_ND96asr_v4", 96, gpus=8, image=JAMMY_GEN1)
    p = only(run_check(config)[0], "error")
    assert (p.node_type, p.field) == ("ray.worker.a100", "imageSku")
    assert "generation V1" in p.message and "supports V2 only" in p.message
    # ubuntu-hpc 2204 is Gen2: fine on the same size
    config["available_node_types"]["ray.worker.a100"] = worker("Standard_ND96asr_v4", 96, gpus=8)
    assert run_check(config)[0] == []


def test_image_missing_in_location():
    config = base_config()
    config["available_node_types"]["ray.worker.cpu"] = worker("Standard_D4s_v3", 4, image=("acme", "nope", "1"))
    p = only(run_check(config)[0], "error")
    assert (p.node_type, p.field) == ("ray.worker.cpu", "imageSku")
    assert "acme:nope:1:latest does not exist in eastus" in p.message


@pytest.mark.parametrize("quota,types,field", [
    # regional cores: head 4 + cpu min 1 x 4 = 8 of 100; make only 6 free
    ("cores", "ray.head,ray.worker.cpu,ray.worker.gpu", "cores"),
    ("standardNCASv3_T4Family", "ray.worker.gpu", "family"),
    ("lowPriorityCores", "ray.worker.spot", "spot"),
])
def test_quota_for_min_workers_is_an_error(quota, types, field):
    config = base_config()
    nt = config["available_node_types"]
    if field == "family":
        nt["ray.worker.gpu"]["min_workers"] = 2          # 8 vCPUs of the T4 family
    if field == "spot":
        nt["ray.worker.spot"]["min_workers"] = 2         # 8 Spot vCPUs
    usages = [u if u["name"]["value"] != quota else usage(quota, 10, current=4) for u in default_usages()]
    problems, _ = run_check(config, make_arm(usages=usages))
    p = only(problems, "error")
    assert (p.node_type, p.field) == (types, "min_workers")
    assert "free 6" in p.message and "limit 10, in use 4" in p.message


@pytest.mark.parametrize("quota,types,need,limit", [
    # at min: head 4 + cpu 1x4 = 8 regional vCPUs (fits 16 free); at max: head 4 + cpu 4x4 + gpu 2x4 = 28
    ("cores", "ray.head,ray.worker.cpu,ray.worker.gpu", 28, 20),
    ("standardNCASv3_T4Family", "ray.worker.gpu", 8, 10),   # min 0, max 2x4
    ("lowPriorityCores", "ray.worker.spot", 8, 10),
])
def test_quota_for_max_workers_is_a_warning(quota, types, need, limit):
    usages = [u if u["name"]["value"] != quota else usage(quota, limit, current=4) for u in default_usages()]
    problems, _ = run_check(base_config(), make_arm(usages=usages))
    p = only(problems, "warning")
    assert (p.node_type, p.field) == (types, "max_workers")
    assert f"needs {need:g} " in p.message and f"free {limit - 4}" in p.message


def test_max_workers_counts_the_cluster_cap_largest_vms_first():
    config = base_config()
    config["max_workers"] = 1  # at most one worker: the head's 4 + one 4-vCPU VM = 8
    usages = [u if u["name"]["value"] != "cores" else usage("cores", 8) for u in default_usages()]
    assert run_check(config, make_arm(usages=usages))[0] == []
    assert preflight._worst_case([(4, 3), (96, 2)], 3) == 96 * 2 + 4
    assert preflight._worst_case([(4, 3), (96, 2)], None) == 96 * 2 + 12


def test_no_credential_stops_before_any_arm_call():
    from azure.core.exceptions import ClientAuthenticationError

    cred = FakeCredential(fail=ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token"))
    problems, arm = run_check(base_config(), credential=cred)
    p = only(problems, "error")
    assert p.field == "credential" and p.node_type is None
    assert "failed to retrieve a token" in p.message and "az login" in p.message
    assert arm.sent == []


def test_resource_group_missing():
    p = only(run_check(base_config(), make_arm(rg_exists=False))[0], "error")
    assert p.field == "provider.resource_group"
    assert str(p).startswith("provider.resource_group: resource group 'rb-rg' does not exist")


def test_az_not_logged_in_and_the_real_probe(monkeypatch, tmp_path):
    p = only(run_check(base_config(), az=lambda: False)[0], "error")
    assert p.field == "az login"
    # the default probe runs `az account show`: a missing az says so
    monkeypatch.setenv("PATH", str(tmp_path))
    ok, why = preflight.az_cli_logged_in()
    assert not ok and "not installed" in why
    fake_az = tmp_path / "az"
    fake_az.write_text("#!/bin/sh\necho 'Please run az login to setup account.' >&2\nexit 1\n")
    fake_az.chmod(0o755)
    ok, why = preflight.az_cli_logged_in()
    assert not ok and "exited 1" in why and "Please run az login" in why


def test_not_an_azure_config_and_missing_fields():
    config = base_config()
    config["provider"] = {"type": "fake_multinode"}
    p = only(preflight.check(config, credential=FakeCredential(), az_logged_in=True), "error")
    assert p.field == "provider.type"
    config = base_config()
    del config["provider"]["resource_group"]
    del config["available_node_types"]["ray.worker.cpu"]["node_config"]["azure_arm_parameters"]["vmSize"]
    fields = {(p.node_type, p.field) for p in run_check(config)[0]}
    assert fields == {(None, "provider.resource_group"), ("ray.worker.cpu", "node_config.azure_arm_parameters.vmSize")}


def test_missing_azure_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.mgmt.compute", None)
    p = only(preflight.check(base_config(), credential=FakeCredential(), az_logged_in=True), "error")
    assert "pip install 'raybatch[azure]'" in p.message


# ---------------------------------------------------------------- the CLI, in-process


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """`raybatch cluster check` with preflight.check bound to a fake ARM and credential."""
    from raybatch.cli.main import app

    def invoke(config, arm=None, *args):
        arm = arm or make_arm()
        from raybatch.cluster import configs

        # these configs hold only what the pre-flight reads; check's lint step is tested in
        # tests/test_cluster_lifecycle.py
        monkeypatch.setattr(configs, "lint", lambda config, source="": [])
        monkeypatch.setattr(preflight, "check", functools.partial(
            _REAL_CHECK, credential=FakeCredential(), transport=arm.transport(), az_logged_in=True))
        path = tmp_path / "cluster.yaml"
        import yaml

        path.write_text(yaml.safe_dump(config))
        return CliRunner().invoke(app, ["cluster", "check", str(path), *args])

    return invoke


_REAL_CHECK = preflight.check


def test_cli_prints_one_line_per_problem_and_exits_1_on_errors(cli):
    config = base_config()
    config["available_node_types"]["ray.worker.cpu"]["resources"]["CPU"] = 8
    config["available_node_types"]["ray.worker.spot"]["resources"]["CPU"] = 2
    r = cli(config)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines == ["error: ray.worker.cpu resources.CPU: 8 declared but Standard_D4s_v3 has 4 vCPUs",
                     "warning: ray.worker.spot resources.CPU: 2 declared but Standard_NC4as_T4_v3 has 4 vCPUs "
                     "(2 left idle)"]


def test_cli_json_and_exit_codes(cli, tmp_path):
    config = base_config()
    config["available_node_types"]["ray.worker.spot"]["resources"]["CPU"] = 2
    r = cli(config, None, "-o", "json")
    assert r.exit_code == 0, r.output  # a warning only
    assert json.loads(r.output) == [{"level": "warning", "node_type": "ray.worker.spot", "field": "resources.CPU",
                                     "message": "2 declared but Standard_NC4as_T4_v3 has 4 vCPUs (2 left idle)"}]
    r = cli(base_config())
    assert r.exit_code == 0 and "no problems found" in r.output
    from raybatch.cli.main import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    r = CliRunner().invoke(app, ["cluster", "check", str(bad)])
    assert r.exit_code == 2 and "a cluster config is a YAML mapping" in r.output


def test_problem_is_one_line():
    p = preflight.Problem("error", "ray.worker.gpu", "min_workers", "the head plus min_workers need 8 vCPUs")
    assert str(p) == "ray.worker.gpu min_workers: the head plus min_workers need 8 vCPUs"
    assert "\n" not in str(copy.copy(p))


def test_an_arm_error_is_read_as_the_provider_reads_it():
    """The pre-flight and raybatch's provider read ARM errors one way (azure.arm_error): the
    specific code past the wrappers, on one line."""
    arm = make_arm()
    arm.route("GET", r"/providers/Microsoft.Compute/skus$", {"error": {
        "code": "BadRequest", "message": "The request is not valid.\nSee details.",
        "details": [{"code": "NoRegisteredProviderFound",
                     "message": "No registered resource provider found for location 'eastus'."}]}}, status=400)
    p = only(run_check(base_config(), arm)[0], "error")
    assert p.field == "provider.location"
    assert p.message == ("cannot list VM sizes in eastus: NoRegisteredProviderFound: No registered resource "
                         "provider found for location 'eastus'.")
    arm = make_arm()
    arm.error("HEAD", r"/resourcegroups/[^/]+$", 403, "AuthorizationFailed", "The client 'x' has no access.\nMore.")
    p = only(run_check(base_config(), arm)[0], "error")
    assert str(p) == "provider.resource_group: cannot check 'rb-rg': AuthorizationFailed: The client 'x' has no access."
