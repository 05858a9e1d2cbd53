"""cluster_configs/kuberay-aks.yaml: a RayCluster for AKS users. It has not been run on AKS
(no Kubernetes here); this checks that every field it sets is a RayCluster v1 field that
KubeRay's published samples use (ray-project/kuberay, ray-operator/config/samples/, each
field listed with the sample it was taken from), and that it carries raybatch's resources,
markers and the server's volume. Nothing here talks to a cluster."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

FILE = Path(__file__).resolve().parents[1] / "cluster_configs" / "kuberay-aks.yaml"

# RayCluster v1 fields, as "a.b[].c" paths, with the KubeRay sample that uses each.
RAYCLUSTER_FIELDS = {
    "apiVersion": "ray-cluster.complete.yaml",
    "kind": "ray-cluster.complete.yaml",
    "metadata.name": "ray-cluster.complete.yaml",
    "spec.rayVersion": "ray-cluster.complete.yaml",
    "spec.enableInTreeAutoscaling": "ray-cluster.autoscaler.yaml",
    "spec.autoscalerOptions.upscalingMode": "ray-cluster.autoscaler.yaml",
    "spec.autoscalerOptions.idleTimeoutSeconds": "ray-cluster.autoscaler.yaml",
    "spec.authOptions.mode": "ray-cluster.auth.yaml",
    "spec.authOptions.secretName": "ray-cluster.auth.secret-ref.yaml",
    "spec.headGroupSpec.serviceType": "ray-cluster.complete.yaml",
    "spec.headGroupSpec.rayStartParams.*": "ray-cluster.complete.yaml (dashboard-host), "
                                           "ray-cluster.autoscaler.yaml (num-cpus, resources)",
    "spec.headGroupSpec.template": "ray-cluster.complete.yaml",
    "spec.workerGroupSpecs[].groupName": "ray-cluster.complete.yaml",
    "spec.workerGroupSpecs[].replicas": "ray-cluster.complete.yaml",
    "spec.workerGroupSpecs[].minReplicas": "ray-cluster.complete.yaml",
    "spec.workerGroupSpecs[].maxReplicas": "ray-cluster.complete.yaml",
    "spec.workerGroupSpecs[].rayStartParams.*": "ray-cluster.autoscaler.yaml",
    "spec.workerGroupSpecs[].labels.*": "ray-cluster-label-selector.yaml",
    "spec.workerGroupSpecs[].template": "ray-cluster.complete.yaml",
}
# Pod template fields under <group>.template, with the sample that uses each.
POD_FIELDS = {
    "spec.containers[].name": "ray-cluster.complete.yaml",
    "spec.containers[].image": "ray-cluster.complete.yaml",
    "spec.containers[].ports[].containerPort": "ray-cluster.complete.yaml",
    "spec.containers[].ports[].name": "ray-cluster.complete.yaml",
    "spec.containers[].resources.limits.*": "ray-cluster.complete.yaml (cpu, memory), ray-cluster.verl.yaml (nvidia.com/gpu)",
    "spec.containers[].resources.requests.*": "ray-cluster.complete.yaml",
    "spec.containers[].volumeMounts[].mountPath": "ray-cluster.complete.yaml",
    "spec.containers[].volumeMounts[].name": "ray-cluster.complete.yaml",
    "spec.containers[].command[]": "ray-cluster.auth-manual.yaml",
    "spec.containers[].args[]": "ray-cluster.head-command.yaml",
    "spec.containers[].env[].name": "ray-cluster.auth-manual.yaml",
    "spec.containers[].env[].value": "ray-cluster.auth-manual.yaml",
    "spec.containers[].env[].valueFrom.secretKeyRef.name": "ray-cluster.auth-manual.yaml",
    "spec.containers[].env[].valueFrom.secretKeyRef.key": "ray-cluster.auth-manual.yaml",
    "spec.volumes[].name": "ray-cluster.complete.yaml",
    "spec.volumes[].persistentVolumeClaim.claimName": "ray-cluster.persistent-redis.yaml",
    "spec.nodeSelector.*": "ray-cluster-label-selector.yaml",
    "spec.tolerations[].key": "pytorch-text-classifier/ray-job.pytorch-distributed-training.yaml",
    "spec.tolerations[].operator": "pytorch-text-classifier/ray-job.pytorch-distributed-training.yaml",
    "spec.tolerations[].value": "Kubernetes core/v1 Toleration (the samples use operator Exists)",
    "spec.tolerations[].effect": "pytorch-text-classifier/ray-job.pytorch-distributed-training.yaml",
}


def paths(node, prefix=""):
    """Every leaf of a YAML tree as a path: a.b[].c; mapping keys under a free-form map
    (labels, rayStartParams, ...) are matched by '*' in the field lists."""
    if isinstance(node, dict):
        if not node:
            yield prefix
        for k, v in node.items():
            yield from paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for v in node:
            yield from paths(v, f"{prefix}[]")
    else:
        yield prefix


def allowed(path: str, fields: dict[str, str]) -> bool:
    for f in fields:
        if f.endswith(".*"):  # a free-form map: any key (keys may hold dots: nvidia.com/gpu)
            rest = path[len(f) - 1:] if path.startswith(f[:-1]) else ""
            if rest and "[]" not in rest:
                return True
        elif path == f:
            return True
    return False


def load():
    docs = list(yaml.safe_load_all(FILE.read_text()))
    [rc] = [d for d in docs if d["kind"] == "RayCluster"]
    return rc, docs


def groups(rc):
    return [("head", rc["spec"]["headGroupSpec"])] + [(g["groupName"], g) for g in rc["spec"]["workerGroupSpecs"]]


def test_only_raycluster_v1_fields_from_kuberay_samples():
    rc, _ = load()
    assert rc["apiVersion"] == "ray.io/v1"
    unknown = []
    for p in paths(rc):
        m = re.match(r"^(spec\.headGroupSpec|spec\.workerGroupSpecs\[\])\.template\.(.+)$", p)
        if m:
            if not allowed(m.group(2), POD_FIELDS):
                unknown.append(p)
        elif not allowed(p, RAYCLUSTER_FIELDS):
            unknown.append(p)
    assert unknown == []


def test_the_field_check_catches_a_field_no_sample_uses():
    rc, _ = load()
    rc["spec"]["headGroupSpec"]["replicaz"] = 1
    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullSecret"] = "x"
    bad = [p for p in paths(rc) if not (allowed(p, RAYCLUSTER_FIELDS) or (
        ".template." in p and allowed(p.split(".template.", 1)[1], POD_FIELDS)))]
    assert bad == ["spec.headGroupSpec.replicaz", "spec.workerGroupSpecs[].template.spec.containers[].imagePullSecret"]


def test_values_have_the_types_kuberay_takes():
    rc, _ = load()
    for name, g in groups(rc):
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), name  # map[string]string
        for c in g["template"]["spec"]["containers"]:
            for side in ("limits", "requests"):
                assert all(isinstance(v, str) for v in c["resources"][side].values()), (name, c["name"])
        if name != "head":
            assert isinstance(g["replicas"], int) and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            assert all(isinstance(v, str) for v in (g.get("labels") or {}).values())
        # KubeRay's Ray container is the first one; its image carries the cluster's Ray version
        ray = g["template"]["spec"]["containers"][0]
        assert ray["name"] == ("ray-head" if name == "head" else "ray-worker")
        assert ray["image"].endswith(":" + rc["spec"]["rayVersion"]) and rc["spec"]["rayVersion"] == "2.60.0"


def ray_resources(g) -> dict:
    import json

    raw = g["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_raybatch_resources_markers_and_low_priority():
    rc, _ = load()
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and ray_resources(head) == {"raybatch_trial": 1000}
    for name, g in groups(rc)[1:]:
        res = ray_resources(g)
        assert res.get(f"rb_type_{name}") == 1, name
        spot = (g.get("labels") or {}).get("raybatch.io/low-priority") == "true"
        assert spot == (res.get("raybatch_low_priority") == 1), name
    assert [n for n, g in groups(rc)[1:] if ray_resources(g).get("raybatch_low_priority")] == ["spot"]


def test_the_server_runs_on_the_head_with_its_state_on_the_claim():
    rc, docs = load()
    spec = rc["spec"]["headGroupSpec"]["template"]["spec"]
    [server] = [c for c in spec["containers"] if c["name"] == "raybatch-server"]
    assert server["command"] == ["python", "-m", "raybatch.server"]
    args = server["args"]
    state = args[args.index("--state-dir") + 1]
    [claim_volume] = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    [pvc] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim_volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # both containers see the state dir at the same path (attempt drivers run in the Ray container)
    for c in spec["containers"]:
        [mount] = [m for m in c["volumeMounts"] if m["name"] == claim_volume["name"]]
        assert state.startswith(mount["mountPath"] + "/"), c["name"]
    token = {e["name"]: e for e in server["env"]}
    assert token["RAY_AUTH_MODE"]["value"] == "token"
    assert token["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == rc["spec"]["authOptions"]["secretName"]
    [svc] = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert svc["spec"]["ports"][0]["targetPort"] == server["ports"][0]["containerPort"]


def test_it_says_it_was_not_tried_on_aks():
    assert "NOT TRIED ON AKS" in FILE.read_text()
