"""Sweeps without a cluster: the sweep file and Azure ML's sweep YAML (as the CLI writes it
and as azure-ai-ml's own dump() writes it), the search space with Azure's semantics, the
early-termination policies against Azure's worked examples, the metric line parser, the
MLflow reader (on a store real MLflow wrote), the journal and the plot."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raybatch.errors import SpecError
from raybatch.runtime.metrics import MetricCollector, parse_line, read_mlflow
from raybatch.spec.loader import load_job_file
from raybatch.spec.sweep import SweepSpec, param_value
from raybatch.sweep import split_trial_id, trial_id
from raybatch.sweep.policies import IntervalHistory, bandit_stops, evaluates, truncation_stops
from raybatch.sweep.trials import TrialJournal, TrialRecord, ranked

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-sweep"
AZURE_AI_ML = ROOT / ".tools" / "azure-ai-ml" / "bin" / "python"


def sweep(**fields) -> SweepSpec:
    base = {"search_space": {"lr": {"type": "uniform", "min_value": 0, "max_value": 1}},
            "objective": {"primary_metric": "accuracy", "goal": "maximize"}}
    return SweepSpec.model_validate({**base, **fields})


# ---- files ------------------------------------------------------------------------------
def test_the_recipes_sweep_file_is_its_trial_job_with_a_sweep_block():
    spec = load_job_file(RECIPE / "sweep.yaml")
    assert spec.name == "digits-sweep" and spec.code == str(RECIPE)
    assert spec.command.startswith("python train.py --lr ${{search_space.lr}}")
    s = spec.sweep
    assert s.limits.max_total_trials == 16 and s.limits.max_concurrent_trials == 2
    assert s.early_termination.type == "bandit" and s.early_termination.delay_evaluation == 3
    assert spec.slots.max_concurrent == 2 and spec.slots.unit_timeout == 600


def test_a_trial_files_paths_are_relative_to_that_file(tmp_path):
    """The trial's job file in another directory: its code and requirements files (and -r
    items) are found next to it, not next to the sweep file."""
    trial_dir = tmp_path / "trial"
    (trial_dir / "src").mkdir(parents=True)
    (trial_dir / "reqs.txt").write_text("numpy\n")
    (trial_dir / "more.txt").write_text("pyyaml\n")
    (trial_dir / "job.yaml").write_text(yaml.safe_dump({
        "name": "t", "code": "src", "command": "python x.py ${{search_space.lr}}",
        "packages": {"requirements": "reqs.txt", "pip": ["-r more.txt", "six"]}}))
    (tmp_path / "sweeps").mkdir()
    f = tmp_path / "sweeps" / "s.yaml"
    f.write_text(yaml.safe_dump({"trial": "../trial/job.yaml",
                                 "search_space": {"lr": {"type": "choice", "values": [1]}},
                                 "objective": {"primary_metric": "m", "goal": "minimize"}}))
    spec = load_job_file(f)
    assert spec.code == str(trial_dir / "src") and spec.packages.pip == ["numpy", "pyyaml", "six"]


def test_the_azureml_sweep_yaml_runs_as_is():
    spec = load_job_file(RECIPE / "sweep.azureml.yml")
    assert spec.name == "digits-sweep-azureml" and spec.experiment == "recipes"
    assert spec.command.endswith("--epochs 12 --mlflow")
    assert spec.sweep.search_space["lr"].type == "loguniform" and spec.sweep.limits.trial_timeout == 600


@pytest.mark.skipif(not AZURE_AI_ML.exists(), reason="scripts/setup-env --tests installs azure-ai-ml in .tools")
def test_the_yaml_azure_ai_ml_dumps_runs_as_is(tmp_path):
    """Generated here with azure-ai-ml 1.35 (in its own venv: its pins clash with Ray's):
    no $schema, the trial a component whose command uses ${{inputs.X}} bound to the space."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("print(1)\n")
    gen = tmp_path / "gen.py"
    gen.write_text(textwrap.dedent(f"""\
        from azure.ai.ml import command
        from azure.ai.ml.sweep import BanditPolicy, Choice, LogUniform
        job = command(code={str(tmp_path / 'src')!r},
                      command="python train.py --lr ${{{{inputs.lr}}}} --width ${{{{inputs.width}}}} --epochs ${{{{inputs.epochs}}}}",
                      inputs={{"lr": 0.01, "width": 64, "epochs": 6}}, environment="azureml:sklearn@latest",
                      compute="cpu-cluster", display_name="sdk-sweep", experiment_name="sdk")
        sweep = job(lr=LogUniform(min_value=-6.9, max_value=-2.3), width=Choice(values=[32, 64])).sweep(
            compute="cpu-cluster", sampling_algorithm="random", primary_metric="accuracy", goal="Maximize",
            early_termination_policy=BanditPolicy(slack_factor=0.2, evaluation_interval=1, delay_evaluation=2))
        sweep.set_limits(max_total_trials=6, max_concurrent_trials=2, timeout=600)
        sweep.dump({str(tmp_path / 'sweep.yml')!r})
        """))
    subprocess.run([str(AZURE_AI_ML), str(gen)], check=True, capture_output=True, timeout=120)
    dumped = yaml.safe_load((tmp_path / "sweep.yml").read_text())
    assert "$schema" not in dumped and dumped["type"] == "sweep"
    spec = load_job_file(tmp_path / "sweep.yml")
    assert spec.command == "python train.py --lr ${{search_space.lr}} --width ${{search_space.width}} --epochs 6"
    assert spec.sweep.objective.goal == "maximize" and spec.sweep.limits.max_total_trials == 6
    assert spec.name == "sdk-sweep"


@pytest.mark.parametrize("change,problem", [
    ({"sampling_algorithm": "bayesian", "search_space": {"x": {"type": "normal", "mu": 0, "sigma": 1}}},
     "search_space.x: bayesian sampling takes choice and uniform and quniform parameters, not normal"),
    ({"sampling_algorithm": "grid", "search_space": {"x": {"type": "uniform", "min_value": 0, "max_value": 1}}},
     "search_space.x: grid sampling takes choice parameters, not uniform"),
    ({"sampling_algorithm": {"type": "random", "rule": "sobol"}}, "sampling_algorithm.rule: 'sobol' is not available"),
    ({"sampling_algorithm": "bayesian", "early_termination": {"type": "bandit", "slack_factor": 0.1},
      "search_space": {"x": {"type": "choice", "values": [1, 2]}}},
     "early_termination: bayesian sampling cannot be combined with early termination"),
    ({"early_termination": {"type": "bandit"}}, "give exactly one of slack_factor and slack_amount"),
    ({"search_space": {"x": {"type": "gaussian", "mu": 0}}}, "search_space.x: Input tag 'gaussian' found using 'type'"),
    ({"limits": {"max_concurrent_trials": 0}}, "limits.max_concurrent_trials: Input should be greater than or equal to 1"),
])
def test_sweep_rules_are_refused_with_the_field_named(tmp_path, change, problem):
    doc = yaml.safe_load((RECIPE / "sweep.yaml").read_text())
    doc.pop("early_termination")
    doc.update(change)
    doc["trial"] = str(RECIPE / "job.yaml")
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as e:
        load_job_file(f)
    assert "invalid sweep file" in str(e.value)
    assert any(p.startswith(problem) or problem in p for p in e.value.problems), e.value.problems


def test_the_azureml_yaml_refuses_what_azure_refuses(tmp_path):
    doc = yaml.safe_load((RECIPE / "sweep.azureml.yml").read_text())
    doc["sampling_algorithm"] = {"type": "random", "rule": "sobol"}
    f = tmp_path / "s.yml"
    f.write_text(yaml.safe_dump(doc))
    (tmp_path / "train.py").write_text("")
    with pytest.raises(SpecError, match=r"sampling_algorithm.rule: 'sobol' is not available"):
        load_job_file(f)


def test_search_space_placeholders_must_name_a_parameter(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"trial": {"name": "t", "command": "echo ${{search_space.nope}}"},
                                 "search_space": {"lr": {"type": "choice", "values": [1]}},
                                 "objective": {"primary_metric": "m", "goal": "minimize"}}))
    with pytest.raises(SpecError, match=r"command: \$\{\{search_space.nope\}\} is not in search_space \(lr\)"):
        load_job_file(f)
    with pytest.raises(SpecError, match="is a sweep parameter; this job has no search_space"):
        from raybatch.spec.loader import parse_job
        parse_job({"name": "j", "command": "echo ${{search_space.lr}}"})


# ---- the search space -------------------------------------------------------------------
def test_parameter_values_have_azures_meaning():
    s = sweep(search_space={
        "lu": {"type": "loguniform", "min_value": -9.2, "max_value": -2.3},
        "qlu": {"type": "qloguniform", "min_value": 0, "max_value": 5, "q": 10},
        "qu": {"type": "quniform", "min_value": 0, "max_value": 10, "q": 2},
        "ln": {"type": "lognormal", "mu": 0, "sigma": 1},
        "qn": {"type": "qnormal", "mu": 0, "sigma": 1, "q": 0.5},
    })
    sp = s.search_space
    assert param_value(sp["lu"], -9.2) == pytest.approx(math.exp(-9.2))      # exp(uniform)
    assert param_value(sp["lu"], -2.3) == pytest.approx(0.1003, rel=1e-3)
    assert param_value(sp["lu"], 2, base=10) == pytest.approx(100)           # logbase 10
    assert param_value(sp["qlu"], 3.0) == 20                                  # round(exp(3)/10)*10
    assert param_value(sp["qu"], 3.1) == 4 and param_value(sp["qn"], 0.7) == 0.5
    assert param_value(sp["ln"], 1.0) == pytest.approx(math.e)


def test_tune_draws_the_underlying_value_and_the_trial_gets_azures():
    from raybatch.sweep import space

    s = sweep(search_space={"lr": {"type": "loguniform", "min_value": -9.2, "max_value": -2.3},
                            "h": {"type": "choice", "values": [16, 32]}, "k": {"type": "randint", "upper": 3}},
              sampling_algorithm={"type": "random", "seed": 1, "logbase": 10})
    domains = space.tune_space(s)
    assert (domains["lr"].lower, domains["lr"].upper) == (-9.2, -2.3)
    assert space.params_of(s, {"lr": -3.0, "h": 32, "k": 2}) == {"lr": pytest.approx(1e-3), "h": 32, "k": 2}
    g = sweep(search_space={"a": {"type": "choice", "values": [1, 2, 3]}, "b": {"type": "choice", "values": ["x", "y"]}},
              sampling_algorithm="grid", limits={"max_total_trials": 4})
    assert [space.params_of(g, {space.GRID_KEY: i}) for i in range(g.total_trials)] == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert space.tune_space(g)[space.GRID_KEY] == {"grid_search": [0, 1, 2, 3]}
    assert space.params_of(g, {space.GRID_KEY: 3}) == {"a": 2, "b": "y"} and space.num_samples(g) == 1
    assert g.total_trials == 4


# ---- early termination: Azure's worked examples -------------------------------------------
def history(values: dict[str, list[float]], maximize: bool = True) -> IntervalHistory:
    h = IntervalHistory(maximize)
    for t, vs in values.items():
        for v in vs:
            h.add(t, v)
    return h


def test_bandit_slack_factor_azures_example():
    """"if the best performing run at interval 10 reported a primary metric of 0.8 with a goal
    to maximize, any run below 0.8/(1+0.2) = 0.667 at interval 10 is cancelled"."""
    from raybatch.spec.sweep import Bandit

    policy = Bandit(type="bandit", slack_factor=0.2, evaluation_interval=1, delay_evaluation=5)
    vals = {"best": [0.5] * 9 + [0.8], "close": [0.5] * 9 + [0.7], "far": [0.5] * 9 + [0.66]}
    h = history(vals)
    assert not bandit_stops(policy, h, "close", 10) and bandit_stops(policy, h, "far", 10)
    assert not bandit_stops(policy, history({"best": [0.8], "far": [0.1]}), "far", 1)  # delayed until 5
    amount = Bandit(type="bandit", slack_amount=0.2)
    h = history({"best": [0.8], "ok": [0.61], "out": [0.59]})
    assert not bandit_stops(amount, h, "ok", 1) and bandit_stops(amount, h, "out", 1)
    h = history({"best": [1.0], "ok": [1.15], "out": [1.25]}, maximize=False)  # minimize: best * (1 + 0.2)
    factor = Bandit(type="bandit", slack_factor=0.2)
    assert not bandit_stops(factor, h, "ok", 1) and bandit_stops(factor, h, "out", 1)


def test_evaluation_interval_and_delay():
    assert [n for n in range(1, 12) if evaluates(n, 1, 5)] == [5, 6, 7, 8, 9, 10, 11]
    assert [n for n in range(1, 12) if evaluates(n, 3, 2)] == [2, 5, 8, 11]
    assert [n for n in range(1, 4) if evaluates(n, 0, 0)] == [1, 2, 3]


def test_truncation_selection_azures_example():
    """"truncation_percentage 20, interval 1, delay 5: a run is cancelled at interval 5 if its
    performance at interval 5 is in the lowest 20% of all runs' performance at interval 5"."""
    from raybatch.spec.sweep import TruncationSelection

    policy = TruncationSelection(type="truncation_selection", truncation_percentage=20, evaluation_interval=1,
                                 delay_evaluation=5)
    vals = {f"r{i}": [0.0] * 4 + [v] for i, v in enumerate([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])}
    h = history(vals)
    stopped = [t for t in vals if truncation_stops(policy, h, t, 5)]
    assert stopped == ["r8", "r9"]  # the lowest 20% of 10 runs
    assert not any(truncation_stops(policy, h, t, 4) for t in vals)  # before the delay


# ---- metrics ---------------------------------------------------------------------------------
def test_metric_lines():
    assert parse_line("RAYBATCH_METRIC accuracy=0.93 step=5") == [("accuracy", 0.93, 5)]
    assert parse_line("  RAYBATCH_METRIC loss=0.1 acc=0.9") == [("loss", 0.1, None), ("acc", 0.9, None)]
    assert parse_line("RAYBATCH_METRIC acc=nan step=1") == [] and parse_line("accuracy=0.9") == []
    import re
    rx = re.compile(r"epoch (?P<step>\d+) accuracy (?P<accuracy>[0-9.]+)")
    assert parse_line("epoch 3 accuracy 0.8123", rx) == [("accuracy", 0.8123, 3)]


def test_collector_merges_the_three_paths_into_one_store(tmp_path):
    c = MetricCollector(str(tmp_path / "metrics.jsonl"), str(tmp_path / "lm.jsonl"), None, None).start()
    c.line("RAYBATCH_METRIC loss=0.5")
    c.line("RAYBATCH_METRIC loss=0.4")
    (tmp_path / "lm.jsonl").write_text('{"name": "acc", "value": 0.7, "step": 2, "t": 1.0}\n{"name": "acc", "va')
    c.finish()
    events, done = c.since(0, 0)
    assert done and [(e["name"], e["value"], e["step"], e["source"]) for e in events] == [
        ("loss", 0.5, 0, "stdout"), ("loss", 0.4, 1, "stdout"), ("acc", 0.7, 2, "log_metric")]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_stdout_tee_hands_every_metric_line_to_the_collector_whatever_the_chunks(tmp_path):
    """Lines split across pipe reads, several in one read, and a last line without a newline
    all reach the parser; the log file gets every byte."""
    import io
    import os
    import threading

    from raybatch.runtime.rank import _tee

    c = MetricCollector(str(tmp_path / "metrics.jsonl"), str(tmp_path / "lm.jsonl"), None, None)
    r, w = os.pipe()
    t = threading.Thread(target=_tee, args=(os.fdopen(r, "rb"), tmp_path / "stdout.txt", io.BytesIO(), [0.0],
                                            c.raw_line))
    t.start()
    text = b"epoch 1\nRAYBATCH_METRIC loss=0.5\nRAYBATCH_MET" + b"RIC loss=0.4 step=7\nnoise\nRAYBATCH_METRIC acc=0.9"
    for part in (text[:5], text[5:40], text[40:41], text[41:]):
        os.write(w, part)
    os.close(w)
    t.join()
    assert [(e["name"], e["value"], e["step"]) for e in c.events] == [("loss", 0.5, 0), ("loss", 0.4, 7),
                                                                     ("acc", 0.9, 0)]
    assert (tmp_path / "stdout.txt").read_bytes() == text


def test_a_rank_that_ends_while_it_is_stopped_reads_its_metrics_tail_once(tmp_path):
    """The rank's wait and a terminate both finish its collector, at once: the tail of its
    metrics file is read once."""
    import threading

    for k in range(10):
        lm = tmp_path / f"lm{k}.jsonl"
        lm.write_text("".join(f'{{"name": "acc", "value": {i}, "step": {i}}}\n' for i in range(2000)))
        c = MetricCollector(str(tmp_path / f"m{k}.jsonl"), str(lm), None, None)
        go = threading.Barrier(2)
        threads = [threading.Thread(target=lambda: (go.wait(), c.finish())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(c.since(0, 0)[0]) == 2000


def test_raybatch_log_metric_writes_the_metrics_file(tmp_path, monkeypatch):
    import raybatch

    monkeypatch.setenv("RAYBATCH_METRICS_FILE", str(tmp_path / "m.jsonl"))
    raybatch.log_metric("acc", 0.5, step=1)
    out = subprocess.run([sys.executable, "-c", "import raybatch_metrics as m; m.log_metric('acc', 0.75)"],
                         env={"PYTHONPATH": str(ROOT / "raybatch" / "pylib"), "RAYBATCH_METRICS_FILE": str(tmp_path / "m.jsonl")},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert '"value": 0.5' in lines[0] and '"value": 0.75' in lines[1]


def test_rank_zeros_mlflow_store_is_synced_with_its_nodes_outputs_and_checkpoints():
    """With logs, outputs and checkpoints in blob storage, node 0's first rank uploads its
    outputs and checkpoints and its MLflow store (which its log dir holds) as it runs."""
    from raybatch import frameworks
    from raybatch.runtime.launch import AttemptDirs, UnitPlan, plan_ranks
    from raybatch.spec.job import JobSpec
    from raybatch.storage.datastores import Access
    from raybatch.storage.plan import AttemptStorage

    def blob(path):
        return Access("blob", path, container="c", endpoint="http://acct.blob", uri=f"az://c/{path}")

    spec = JobSpec.model_validate({"name": "j", "command": "python train.py"})
    st = AttemptStorage(logs=blob("j/stdouterr"), checkpoints=blob("j/checkpoints"), outputs={"model": blob("j/out")})
    [x] = plan_ranks(spec, frameworks.get(spec.framework), st, AttemptDirs("rb-1", 1), job_dir="az://c/j",
                     infos=[{"node_id": "n0", "node_ip": "10.0.0.1", "hostname": "h0"}], ports=[29500],
                     code_dirs={}, staged_inputs={})
    synced = {remote["path"] for _local, remote in x.sync_dirs}
    assert synced == {"j/stdouterr/attempt-1/rank-0/mlflow", "j/out", "j/checkpoints"}, synced
    # a trial's run: its outputs and checkpoints are its own, below the job's
    unit = UnitPlan(logs_rel=lambda r: f"trials/3/attempt-2/rank-{r}", checkpoint_rel="trials/3", output_rel="trials/3")
    [t] = plan_ranks(spec, frameworks.get(spec.framework), st, AttemptDirs("rb-1", 1, slot=0), job_dir="az://c/j",
                     infos=[{"node_id": "n0", "node_ip": "10.0.0.1", "hostname": "h0"}], ports=[29500],
                     code_dirs={}, staged_inputs={}, unit=unit)
    assert t.env["RAYBATCH_OUTPUT_MODEL"].endswith("/outputs/model/trials/3") and t.env["RAYBATCH_OUTPUT_MODEL"] in t.make_dirs
    assert {remote["path"] for _local, remote in t.sync_dirs} == {
        "j/stdouterr/trials/3/attempt-2/rank-0/mlflow", "j/out/trials/3", "j/checkpoints/trials/3"}


def test_the_mlflow_reader_on_a_store_mlflow_wrote(tmp_path):
    """Real MLflow (>= 3.13 refuses file stores) writing to a SQLite store, read with stdlib sqlite3."""
    db = tmp_path / "mlflow.db"
    code = textwrap.dedent(f"""\
        import mlflow
        mlflow.set_tracking_uri("sqlite:///{db}")
        with mlflow.start_run():
            for step in range(3):
                mlflow.log_metric("accuracy", 0.5 + step / 10, step=step)
            mlflow.log_metric("loss", 1.5)
        """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    rows, last = read_mlflow(db)
    assert [(n, round(v, 3), s) for n, v, s, _ in rows] == [("accuracy", 0.5, 0), ("accuracy", 0.6, 1),
                                                              ("accuracy", 0.7, 2), ("loss", 1.5, 0)]
    assert read_mlflow(db, last) == ([], last)


# ---- trials ----------------------------------------------------------------------------------
def test_trial_ids():
    assert trial_id("rb-1a2b", 3) == "rb-1a2b.t3" and split_trial_id("rb-1a2b.t3") == ("rb-1a2b", 3)
    assert split_trial_id("rb-1a2b") == ("rb-1a2b", None)


def test_journal_last_line_wins_and_a_torn_line_is_ignored(tmp_path):
    from raybatch.storage.backends import open_backend
    from raybatch.storage.datastores import Access

    j = TrialJournal(open_backend(Access("local", str(tmp_path), uri=str(tmp_path))))
    j.started("tune-a", 0)
    j.ended(TrialRecord(0, {"lr": 0.1}, state="done", best=0.9))
    j.ended(TrialRecord(1, {"lr": 0.2}, state="failed", message="exit 3"))
    with open(tmp_path / "trials.jsonl", "a") as f:
        f.write('{"n": 2, "params"')
    recs = j.records()
    assert sorted(recs) == [0, 1] and recs[0].best == 0.9 and j.ids() == {"tune-a": 0}
    order = ranked([TrialRecord(0, {}, best=0.5), TrialRecord(1, {}, best=0.9), TrialRecord(2, {})], maximize=True)
    assert [r.n for r in order] == [1, 0, 2]


def test_journal_appends_from_many_slot_threads_lose_no_line(tmp_path):
    """Slots end trials from their own threads (and early termination from Tune's): every
    end is journaled, none truncates another (each append is at the size the last left)."""
    import threading

    from raybatch.storage.backends import open_backend
    from raybatch.storage.datastores import Access

    j = TrialJournal(open_backend(Access("local", str(tmp_path), uri=str(tmp_path))))
    go = threading.Barrier(8)

    def end(k):
        go.wait()
        for i in range(25):
            j.ended(TrialRecord(k * 25 + i, {"lr": 0.1}, state="done", best=float(i)))

    threads = [threading.Thread(target=end, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j.records()) == list(range(200))
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 200


def test_the_plot_is_a_picture(tmp_path):
    from raybatch.sweep.plot import sweep_page

    page = sweep_page("s", "accuracy", True,
                      [{"id": "rb-1.t1", "params": {"lr": 0.001, "h": 32}, "best": 0.9},
                       {"id": "rb-1.t0", "params": {"lr": 0.1, "h": 64}, "best": 0.5}],
                      {"rb-1.t1": [(1, 0.5), (2, 0.9)], "rb-1.t0": [(1, 0.4), (2, 0.5)]})
    assert page.count("<svg") == 2 and page.count("<polyline") == 4 and "best: rb-1.t1" in page
    assert "lr (log)" in page and "<script" not in page
