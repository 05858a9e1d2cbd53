"""Sweeps end to end: a real 3-node Ray cluster, a real raybatch server, real Ray Tune.
Trials report through all three metric paths; the bandit policy stops trials (SIGTERM,
within their grace); pytorch/gloo trials of 2 nodes; one slot preempted and its trial
resumed from its checkpoint; the server and then the driver killed with SIGKILL; Azure
ML's sweep YAML (the CLI's and azure-ai-ml's dump) run as they are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import RECIPES, RayTestCluster, ServerProcess, run_cli, stop_everything, wait_for

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
AZURE_AI_ML = ROOT / ".tools" / "azure-ai-ml" / "bin" / "python"

TRIAL = """\
import os, pathlib, signal, sys, time
marks = pathlib.Path(os.environ["MARKS"])
trial = os.environ["RAYBATCH_TRIAL"]

def mark(what):
    with open(marks / f"t{trial}.log", "a") as f:
        f.write(f"{os.environ['RAYBATCH_TRIAL_RUN']} {what}\\n")

def term(*_):
    mark("term")
    sys.exit(143)

signal.signal(signal.SIGTERM, term)
x, seed = float(sys.argv[1]), int(sys.argv[2])
assert float(os.environ["RAYBATCH_PARAM_X"]) == x and os.environ["AZUREML_SWEEP_seed"] == str(seed)
mark("start")
ckpt = pathlib.Path(os.environ["RAYBATCH_CHECKPOINT_DIR"]) / "epoch"
start = int(ckpt.read_text()) if ckpt.exists() else 0
if start:
    print(f"resumed from checkpoint at epoch {start}", flush=True)
from raybatch_metrics import log_metric
use_mlflow = seed == 0
if use_mlflow:
    import mlflow
for epoch in range(start + 1, int(os.environ.get("EPOCHS", "6")) + 1):
    log_metric("accuracy", x, step=epoch)
    print(f"RAYBATCH_METRIC loss={1 - x} step={epoch}", flush=True)
    if use_mlflow:
        mlflow.log_metric("ml_accuracy", x, step=epoch)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(str(epoch))
    time.sleep(float(os.environ.get("SLEEP", "0.2")))
mark("done")
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = RayTestCluster(nodes=3)
    state = tmp_path_factory.mktemp("sweeps")
    server = ServerProcess(cluster, state).start()
    code = state / "trial-code"
    code.mkdir()
    (code / "trial.py").write_text(TRIAL)
    box = {"cluster": cluster, "server": server, "state": state, "code": code}
    yield box
    try:
        stop_everything(box["server"])
    finally:
        box["server"].stop()
        cluster.shutdown()


def cli(env, *args, check=True):
    return run_cli(env["server"], *args, check=check)


def sweep_file(env, tmp_path, name, sweep: dict, **trial) -> Path:
    (tmp_path / "marks").mkdir(exist_ok=True)
    job = {"name": f"{name}-trial", "code": str(env["code"]), "resources": {"cpus": 1}, "grace_period": "5s",
           "command": "python trial.py ${{search_space.x}} ${{search_space.seed}}", **trial}
    job["environment"] = {"MARKS": str(tmp_path / "marks"), **trial.get("environment", {})}
    doc = {"name": name, "experiment": "sweeps", "trial": job, **sweep}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def submit(env, path, *extra) -> str:
    return cli(env, "submit", str(path), *extra).stdout.splitlines()[0].strip()


def marks(tmp_path) -> dict[str, list[tuple[str, str]]]:
    return {f.stem: [tuple(line.split()) for line in f.read_text().splitlines()]
            for f in (tmp_path / "marks").glob("*.log")}


GRID = {"search_space": {"x": {"type": "choice", "values": [0.9, 0.2]}, "seed": {"type": "choice", "values": [0, 1, 2, 3]}},
        "sampling_algorithm": "grid", "objective": {"primary_metric": "accuracy", "goal": "maximize"},
        "early_termination": {"type": "bandit", "slack_factor": 0.1, "evaluation_interval": 1, "delay_evaluation": 2},
        "limits": {"max_total_trials": 8, "max_concurrent_trials": 2, "trial_timeout": "2m"}}


# ---------------------------------------------------------------------------------------------
def test_a_sweep_with_three_metric_paths_and_the_bandit_policy(env, tmp_path):
    job_id = submit(env, sweep_file(env, tmp_path, "bandit", GRID, environment={"EPOCHS": "6"}))
    client = env["server"].client()
    done = client.wait(job_id, timeout=240, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    trials = client.trials(job_id)
    assert len(trials) == 8 and {t.id for t in trials} == {f"{job_id}.t{n}" for n in range(8)}
    stopped = [t for t in trials if t.state == "early_terminated"]
    assert stopped and all(t.params["x"] == 0.2 for t in stopped), [(t.id, t.state, t.params) for t in trials]
    assert trials[0].best == 0.9 and trials[0].rank == 1 and trials[0].state == "done"
    seen = marks(tmp_path)
    for t in stopped:  # SIGTERM reached the process, which exited within its grace
        m = seen[f"t{t.n}"]
        assert ("1", "term") in m and ("1", "done") not in m, m
        assert t.ended_at - t.started_at < 6 + 5
    names = {(e.name, e.source) for t in trials if t.params["seed"] == 0
             for e in client.metrics(job_id, trial=t.n)}
    assert {("accuracy", "log_metric"), ("loss", "stdout"), ("ml_accuracy", "mlflow")} <= names, names
    ranked = json.loads(cli(env, "sweep", "show", job_id, "-o", "json").stdout)
    assert [t["id"] for t in ranked] == [t.id for t in trials]
    shown = cli(env, "sweep", "show", job_id).stdout
    assert "early_terminated" in shown and "RANK" in shown
    out = tmp_path / "plot.html"
    cli(env, "sweep", "plot", job_id, "-o", str(out))
    assert out.read_text().count("<polyline") >= 8
    assert "accuracy" in cli(env, "show", f"{job_id}.t0").stdout
    assert "epoch" not in cli(env, "logs", f"{job_id}.t0").stdout
    assert "RAYBATCH_METRIC loss=" in cli(env, "logs", job_id, "--trial", "1").stdout
    assert any("trials/0/" in line for line in cli(env, "files", f"{job_id}.t0").stdout.splitlines())


GLOO = """\
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(os.environ["RANK"]) + 1])
dist.all_reduce(t)
print(f"port {os.environ['MASTER_PORT']} world {dist.get_world_size()} sum {t.item()}", flush=True)
from raybatch_metrics import log_metric
log_metric("sum", t.item() * float(sys.argv[1]), step=1)
dist.barrier()
dist.destroy_process_group()
"""


def test_pytorch_gloo_trials_of_two_nodes_each_with_its_own_port(env, tmp_path):
    (env["code"] / "gloo.py").write_text(GLOO)
    path = sweep_file(env, tmp_path, "gloo", {
        "search_space": {"x": {"type": "choice", "values": [1, 2]}},
        "sampling_algorithm": "grid", "objective": {"primary_metric": "sum", "goal": "maximize"},
        "limits": {"max_total_trials": 2, "max_concurrent_trials": 1}},
        framework="pytorch", nodes=2, command="python gloo.py ${{search_space.x}}")
    job_id = submit(env, path)
    client = env["server"].client()
    done = client.wait(job_id, timeout=240, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    ports = set()
    for t in client.trials(job_id):
        assert t.state == "done" and t.best == 3.0 * t.params["x"], t
        line = client.logs(job_id, trial=t.n).strip()
        assert line.endswith("world 2 sum 3.0"), line
        ports.add(line.split()[1])
    assert len(ports) == 2


def test_a_high_priority_job_preempts_one_slot_and_its_trial_resumes(env, tmp_path):
    client = env["server"].client()
    blocker = client.submit({"name": "blocker", "experiment": "sweeps", "priority": "high", "preemptible": False,
                             "command": "sleep 120", "max_wall_clock": "3m"})
    wait_for(lambda: client.get(blocker.id).state.value == "RUNNING", 60, "the blocker to run")
    path = sweep_file(env, tmp_path, "preempted", {
        "search_space": {"x": {"type": "choice", "values": [0.5, 0.6]}, "seed": {"type": "choice", "values": [1]}},
        "sampling_algorithm": "grid", "objective": {"primary_metric": "accuracy", "goal": "maximize"},
        "limits": {"max_total_trials": 2, "max_concurrent_trials": 2}},
        priority="low", environment={"EPOCHS": "10", "SLEEP": "0.6"})
    job_id = submit(env, path)
    wait_for(lambda: sum(1 for s in client.get(job_id).slots if s.activity == "busy") == 2, 90, "2 busy slots")
    time.sleep(2)  # a checkpoint or two
    high = client.submit({"name": "urgent", "experiment": "sweeps", "priority": "high", "command": "echo urgent"})
    assert client.wait(high.id, timeout=90).state.value == "SUCCEEDED"
    done = client.wait(job_id, timeout=200, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    assert len([s for s in done.slots if s.reason and "preempted by" in s.reason]) == 1
    trials = client.trials(job_id)
    assert all(t.state == "done" for t in trials) and sorted(t.runs for t in trials) == [1, 2]
    again = next(t for t in trials if t.runs == 2)
    log = client.logs(job_id, trial=again.n)  # the latest run: attempt 2 of the trial
    assert "resumed from checkpoint at epoch" in log
    assert [w for r, w in marks(tmp_path)[f"t{again.n}"]] == ["start", "term", "start", "done"]
    client.cancel(blocker.id)


def test_server_then_driver_killed_finished_trials_are_not_rerun(env, tmp_path):
    bayes = {"search_space": {"x": {"type": "uniform", "min_value": 0, "max_value": 1},
                              "seed": {"type": "choice", "values": [1, 2]}},
             "sampling_algorithm": "bayesian", "objective": {"primary_metric": "accuracy", "goal": "maximize"},
             "limits": {"max_total_trials": 6, "max_concurrent_trials": 2}}
    job_id = submit(env, sweep_file(env, tmp_path, "survivor", bayes, environment={"EPOCHS": "4", "SLEEP": "0.5"}))
    client = env["server"].client()
    wait_for(lambda: len(client.trials(job_id, state=["done"])) >= 1, 120, "a trial done")
    env["server"].kill(signal.SIGKILL)
    time.sleep(2)
    env["server"] = ServerProcess(env["cluster"], env["state"]).start()
    client = env["server"].client()
    wait_for(lambda: len(client.trials(job_id, state=["done"])) >= 3, 120, "3 trials done")
    report = json.loads((env["state"] / "attempts" / job_id / "1" / "status.json").read_text())
    os.kill(report["pid"], signal.SIGKILL)  # the driver: Ray ends its job, the next attempt restores
    done = client.wait(job_id, timeout=240, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    assert [a.outcome for a in done.attempts] == ["DRIVER_LOST", "SUCCEEDED"]
    trials = client.trials(job_id)
    # the searcher's count went on from its saved state, not over: 6 trials in all. (A trial Tune
    # had started but not yet saved when the driver died is dropped, and one more drawn instead.)
    assert len(trials) == 6 and all(t.state == "done" for t in trials), trials
    assert {t.attempt for t in trials} == {1, 2}
    seen = marks(tmp_path)
    for key, m in seen.items():
        assert [w for _, w in m].count("done") <= 1, (key, m)  # a finished trial never ran again
    assert sum(1 for m in seen.values() if ("1", "done") in m or ("2", "done") in m) == 6


SLOW = """\
import os, pathlib, signal, sys, time
marks = pathlib.Path(os.environ["MARKS"])

def mark(what):
    with open(marks / f"t{os.environ['RAYBATCH_TRIAL']}.log", "a") as f:
        f.write(f"{os.environ['RAYBATCH_TRIAL_RUN']} {what}\\n")

signal.signal(signal.SIGTERM, lambda *_: (mark("term"), sys.exit(143)))
mark("start")
from raybatch_metrics import log_metric
for step in range(int(sys.argv[1])):
    log_metric("accuracy", 1 / (step + 1), step=step)
    time.sleep(1)
mark("done")
"""


def test_limits_timeout_ends_the_sweep_and_cancels_its_unfinished_trials(env, tmp_path):
    """Azure ML's limits.timeout: the sweep ends when it comes; a trial still running gets
    SIGTERM and ends cancelled, one that finished stands, and the sweep succeeds with it."""
    (env["code"] / "slow.py").write_text(SLOW)
    path = sweep_file(env, tmp_path, "timeout", {
        "search_space": {"s": {"type": "choice", "values": [1, 300]}}, "sampling_algorithm": "grid",
        "objective": {"primary_metric": "accuracy", "goal": "maximize"},
        "limits": {"max_total_trials": 2, "max_concurrent_trials": 2, "timeout": "25s"}},
        command="python slow.py ${{search_space.s}}")
    job_id = submit(env, path)
    client = env["server"].client()
    done = client.wait(job_id, timeout=120, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    assert "limits.timeout (25 s) reached" in done.reason
    by_s = {t.params["s"]: t for t in client.trials(job_id)}
    assert by_s[1].state == "done" and by_s[300].state == "cancelled", by_s
    assert marks(tmp_path)[f"t{by_s[300].n}"] == [("1", "start"), ("1", "term")]
    assert "cancelled" in cli(env, "sweep", "show", job_id, "--state", "cancelled").stdout


def test_a_trial_environment_that_cannot_be_built_fails_the_sweep_at_once(env, tmp_path):
    """Its slots cannot be set up: the attempt stops (Tune too) with pip's words, it is not
    left waiting for slots that will never come."""
    path = sweep_file(env, tmp_path, "broken", {
        "search_space": {"x": {"type": "choice", "values": [0.1, 0.2]}, "seed": {"type": "choice", "values": [1]}},
        "sampling_algorithm": "grid", "objective": {"primary_metric": "accuracy", "goal": "maximize"},
        "limits": {"max_total_trials": 2, "max_concurrent_trials": 2}},
        packages={"pip": ["this-package-does-not-exist-raybatch==0.0.1"]})
    job_id = submit(env, path)
    done = env["server"].client().wait(job_id, timeout=120, poll=0.5)
    assert done.state == "FAILED" and [a.outcome for a in done.attempts] == ["START_FAILED"], done.reason
    assert "could not be built" in done.reason and "this-package-does-not-exist-raybatch" in done.reason


def test_azureml_sweep_yaml_with_mlflow_runs_as_is(env, tmp_path):
    job_id = submit(env, RECIPES / "digits-sweep" / "sweep.azureml.yml",
                    "--set", "sweep.limits.max_total_trials=2", "--set", "command=python train.py --lr "
                    "${{search_space.lr}} --hidden ${{search_space.hidden}} --epochs 3 --mlflow")
    client = env["server"].client()
    done = client.wait(job_id, timeout=240, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    trials = client.trials(job_id)
    assert len(trials) == 2 and all(t.reports == 3 and 0 < t.best <= 1 for t in trials), trials
    assert all(1e-4 <= t.params["lr"] <= 0.101 for t in trials)  # exp(uniform(-9.2, -2.3))


@pytest.mark.skipif(not AZURE_AI_ML.exists(), reason="scripts/setup-env --tests installs azure-ai-ml in .tools")
def test_the_yaml_azure_ai_ml_dumps_runs(env, tmp_path):
    gen = tmp_path / "gen.py"
    code = RECIPES / "digits-sweep"
    gen.write_text(textwrap.dedent(f"""\
        from azure.ai.ml import command
        from azure.ai.ml.sweep import Choice, LogUniform
        job = command(code={str(code)!r}, environment="azureml:sklearn@latest", compute="cpu",
                      command="python train.py --lr ${{{{inputs.lr}}}} --hidden ${{{{inputs.width}}}} --epochs ${{{{inputs.epochs}}}}",
                      inputs={{"lr": 0.01, "width": 32, "epochs": 2}}, display_name="sdk-sweep", experiment_name="sweeps")
        sweep = job(lr=LogUniform(min_value=-6.9, max_value=-2.3), width=Choice(values=[16, 32])).sweep(
            compute="cpu", sampling_algorithm="random", primary_metric="accuracy", goal="Maximize")
        sweep.set_limits(max_total_trials=2, max_concurrent_trials=2)
        sweep.dump({str(tmp_path / 'sweep.yml')!r})
        """))
    subprocess.run([str(AZURE_AI_ML), str(gen)], check=True, capture_output=True, timeout=120)
    job_id = submit(env, tmp_path / "sweep.yml")
    done = env["server"].client().wait(job_id, timeout=200, poll=0.5)
    assert done.state == "SUCCEEDED", done.reason
    assert len(env["server"].client().trials(job_id, state=["done"])) == 2


def test_a_plain_jobs_metrics_from_every_path(env, tmp_path):
    """The metric store is every job's: a plain job's rank 0 reports through log_metric,
    RAYBATCH_METRIC lines and a stdout_regex; GET /jobs/{id}/metrics returns them all."""
    (env["code"] / "plain.py").write_text(textwrap.dedent("""\
        from raybatch_metrics import log_metric
        for step in (1, 2):
            log_metric("acc", 0.5 * step, step=step)
            print(f"RAYBATCH_METRIC loss={1 / step} step={step}", flush=True)
            print(f"epoch {step} f1 {0.4 * step}", flush=True)
        """))
    client = env["server"].client()
    job = client.submit({"name": "plain-metrics", "experiment": "sweeps", "code": str(env["code"]),
                         "command": "python plain.py",
                         "metrics": {"stdout_regex": r"epoch (?P<step>\d+) f1 (?P<f1>[.0-9]+)"}})
    assert client.wait(job.id, timeout=120).state.value == "SUCCEEDED"
    got = sorted((e.name, e.step, round(e.value, 3), e.source) for e in client.metrics(job.id))
    assert got == [("acc", 1, 0.5, "log_metric"), ("acc", 2, 1.0, "log_metric"), ("f1", 1, 0.4, "stdout"),
                   ("f1", 2, 0.8, "stdout"), ("loss", 1, 1.0, "stdout"), ("loss", 2, 0.5, "stdout")]
    p = cli(env, "cancel", f"{job.id}.t0", check=False)
    assert p.returncode == 2 and "cancel applies to the whole sweep" in p.stderr
