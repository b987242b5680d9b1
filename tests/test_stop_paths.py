"""How a run ends when something stops it, as `wandb agent` and local_sweep.py see it: the sweep's
stop (a result: `stopped`, exit 0, checkpoint gone), a preemption (`interrupted`, marked
preempting, checkpoint kept and, with --checkpoint_artifact, logged to W&B and restored on
another machine), a diverged run under an agent, the launcher's mixed precision, and one error
line per launch. Offline paths through real offline W&B runs; online ones through fakes."""
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import model as model_module
import processes
import record
import train
from config import ConfigError, TrainConfig
from localsweep.wandb_file import parsed_records
from train_helpers import ROOT, offline_env, offline_run_contents, read_record, small_corpus, tiny_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def at_train_step(step: int, action):
    """Wrap MoELM.forward so that `action()` runs during the training forward of 1-based `step`."""
    original = model_module.MoELM.forward
    calls = {"train": 0}

    def forward(self, ids, targets=None):
        if self.training:
            calls["train"] += 1
            if calls["train"] == step:
                action()
        return original(self, ids, targets)

    return forward


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def offline(monkeypatch, **env):
    import wandb

    wandb.teardown()  # wandb's process-wide settings keep the environment they first saw (a sweep's run id)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_ID", record.STOP_FILE_ENV,
                train.LAUNCHER_PRECISION_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def wandb_side(results: Path, run_id: str) -> tuple[dict, list]:
    """(offline_run_contents, the kinds of all records) of run `run_id`'s newest offline run,
    once its exit record is written (the in-process service writes it a moment after finish)."""
    deadline = time.time() + 30
    while True:
        (run_dir, *_) = sorted((results / "wandb").glob(f"offline-run-*-{run_id}"), reverse=True)
        contents = offline_run_contents(run_dir)
        if contents["exit_code"] is not None or time.time() > deadline:
            (wandb_file,) = run_dir.glob("run-*.wandb")
            return contents, list(parsed_records(wandb_file))
        time.sleep(0.05)


# --- the contract -------------------------------------------------------------------------------

def test_statuses_exit_codes_and_wandb_states_agree():
    """W&B turns exit code 0 into the finished state and anything else into failed (wandb sync,
    run.finish): record.WANDB_STATE must say what the exit code makes of each status."""
    assert set(record.STATUSES) == set(record.WANDB_STATE) == set(record.EXIT_CODES) - {"config"}
    for status in record.STATUSES:
        assert (record.WANDB_STATE[status] == "finished") == (record.EXIT_CODES[status] == 0), status
    assert record.EXIT_CODES["stopped"] == 0 and record.EXIT_CODES["interrupted"] == 130


def test_the_agents_give_up_rule_is_what_the_warning_says():
    """The numbers and variables train.py's warning names are wandb agent's own."""
    import wandb.env
    from wandb.wandb_agent import Agent

    assert (Agent.FLAPPING_MAX_FAILURES, Agent.FLAPPING_MAX_SECONDS, Agent.MAX_INITIAL_FAILURES) == (3, 60, 5)
    assert wandb.env.AGENT_DISABLE_FLAPPING == "WANDB_AGENT_DISABLE_FLAPPING"
    assert wandb.env.AGENT_MAX_INITIAL_FAILURES == "WANDB_AGENT_MAX_INITIAL_FAILURES"


# --- the sweep's stop ---------------------------------------------------------------------------

def assert_stopped(tmp_path, code, capsys):
    results = tmp_path / "results"
    saved = read_record(results, "local", "baseline-s0")
    assert code == 0
    assert saved["status"] == "stopped" and "after step 2" in saved["error"]
    assert [row["step"] for row in saved["history"]] == [1, 2]
    assert not any((results / "local" / "checkpoints").glob("baseline-s0-*"))  # deleted, as for finished
    assert "error:" not in capsys.readouterr().err
    logged, _ = wandb_side(results, saved["run_id"])
    assert logged["exit_code"] == 0 and logged["summary"]["status"] == "stopped"


def test_the_stop_file_makes_a_sigterm_the_sweeps_stop(tmp_path, corpus, monkeypatch, capsys):
    """local_sweep.py creates the file named in $ATTNSWEEP_STOP_FILE, then sends SIGTERM."""
    stop_file = tmp_path / "stop-run"
    offline(monkeypatch, **{record.STOP_FILE_ENV: str(stop_file)})
    monkeypatch.setattr(model_module.MoELM, "forward", at_train_step(2, lambda: (stop_file.touch(), sigterm())))
    code = train.main(tiny_args(tmp_path, corpus, steps=6, checkpoint_every=1))
    assert_stopped(tmp_path, code, capsys)


def test_wandbs_stop_request_ends_the_run_stopped(tmp_path, corpus, monkeypatch, capsys):
    """Online, W&B's SDK calls settings.stop_fn (from its own thread) when the server asks the run
    to stop, and the agent sends SIGTERM too: the run ends stopped, not interrupted."""
    import wandb

    offline(monkeypatch)
    real_init, stop_fns = wandb.init, []

    def init(**kwargs):
        stop_fns.append(kwargs["settings"].stop_fn)
        return real_init(**kwargs)

    def server_says_stop():
        thread = threading.Thread(target=stop_fns[0])
        thread.start()
        thread.join()
        sigterm()  # the agent's _command_stop

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(model_module.MoELM, "forward", at_train_step(2, server_says_stop))
    code = train.main(tiny_args(tmp_path, corpus, steps=6, checkpoint_every=1))
    assert_stopped(tmp_path, code, capsys)


def test_a_sigterm_waits_for_wandbs_stop_request_under_an_online_agent(monkeypatch):
    """The agent's SIGTERM may come before the SDK's poll (every 15 s) has seen the stop request."""
    signals = train.StopSignals()
    try:
        monkeypatch.delenv(record.STOP_FILE_ENV, raising=False)
        threading.Timer(0.2, signals.request_stop).start()
        assert signals.by_sweep() is False
        assert signals.by_sweep(wait_s=5) is True
    finally:
        signals.restore()


# --- preemption -----------------------------------------------------------------------------------

class OnlineRun:
    """The real (offline) W&B run, seen as online, with use_artifact faked: W&B's server holds the
    checkpoint artifact the first attempt logged (here: a directory elsewhere)."""

    def __init__(self, run, store: Path, asked: list):
        self._run, self._store, self._asked = run, store, asked
        self.offline = False

    def __getattr__(self, name):
        return getattr(self._run, name)

    def use_artifact(self, name, type=None):
        self._asked.append((name, type))
        store = self._store

        class Artifact:
            def download(self, root):
                shutil.copytree(store, root)
                return root

        return Artifact()


def test_preempted_under_an_agent_marks_preempting_and_resumes_elsewhere_from_the_artifact(
        tmp_path, corpus, monkeypatch, capsys):
    import wandb

    offline(monkeypatch, WANDB_SWEEP_ID="sweep123", WANDB_RUN_ID="preempt1")  # the agent sets both
    plain_forward = model_module.MoELM.forward
    args = tiny_args(tmp_path, corpus, steps=6, checkpoint_every=2, checkpoint_artifact=True)
    monkeypatch.setattr(model_module.MoELM, "forward", at_train_step(3, sigterm))
    assert train.main(args) == record.EXIT_CODES["interrupted"]
    results = tmp_path / "results"
    first = read_record(results, "sweep123", "baseline-s0")
    assert first["status"] == "interrupted"
    # offline, the server never hears of the preemption: no requeue, so the run says how to continue
    assert first["error"].endswith("offline, so W&B does not hand it out again: continue with this run's "
                                   "options plus --resume --group=sweep123")
    checkpoint = results / "sweep123" / "checkpoints" / f"baseline-s0-{first['run_id']}"
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == 3  # kept
    logged, records = wandb_side(results / "sweep123", first["run_id"])  # an agent's run: beside its records
    assert logged["exit_code"] == 130
    kinds = [kind for kind, _ in records]
    assert "preempting" in kinds  # run.mark_preempting(): W&B requeues the run
    artifacts = [r.artifact for kind, r in records if kind == "artifact"]
    assert [(a.type, a.name) for a in artifacts] == [("checkpoint", f"checkpoint-{first['run_id']}")] * 2  # steps 2, 3

    # the same run id on another machine: no local checkpoint, the artifact brings it back
    store = tmp_path / "artifact-store"
    shutil.move(checkpoint, store)
    capsys.readouterr()
    asked = []
    monkeypatch.setattr(wandb, "init", lambda real=wandb.init, **kw: OnlineRun(real(**kw), store, asked))
    monkeypatch.setattr(model_module.MoELM, "forward", plain_forward)
    assert train.main(args) == 0
    err = capsys.readouterr().err
    assert asked == [(f"checkpoint-{first['run_id']}:latest", "checkpoint")]
    assert "restored the checkpoint" in err and "from its checkpoint at step 3" in err
    final = read_record(results, "sweep123", "baseline-s0")
    assert final["status"] == "finished" and [row["step"] for row in final["history"]] == [1, 2, 3, 4, 5, 6]


def test_preemption_outside_an_agent_is_not_marked_preempting(tmp_path, corpus, monkeypatch):
    offline(monkeypatch)
    monkeypatch.setattr(model_module.MoELM, "forward", at_train_step(2, sigterm))
    assert train.main(tiny_args(tmp_path, corpus, steps=4)) == 130
    saved = read_record(tmp_path / "results", "local", "baseline-s0")
    assert saved["error"].endswith("checkpoint saved; continue with --resume")
    logged, records = wandb_side(tmp_path / "results", saved["run_id"])
    assert logged["exit_code"] == 130 and "preempting" not in [kind for kind, _ in records]
    assert not any(kind == "artifact" for kind, _ in records)  # --checkpoint_artifact is opt-in


# --- a diverged run under wandb agent ---------------------------------------------------------------

@pytest.mark.parametrize("sweep_id", ["sweep123", None])
def test_a_diverged_run_under_an_agent_says_how_to_keep_the_agent_going(tmp_path, corpus, monkeypatch, capsys,
                                                                       sweep_id):
    offline(monkeypatch, WANDB_MODE="disabled", **({"WANDB_SWEEP_ID": sweep_id} if sweep_id else {}))
    original = model_module.MoELM.forward

    def nan_forward(self, ids, targets=None):
        out = original(self, ids, targets)
        return out._replace(loss=out.loss * float("nan")) if self.training else out

    monkeypatch.setattr(model_module.MoELM, "forward", nan_forward)
    assert train.main(tiny_args(tmp_path, corpus, steps=3)) == record.EXIT_CODES["diverged"]
    err = capsys.readouterr().err
    warned = "WANDB_AGENT_DISABLE_FLAPPING=true" in err and "WANDB_AGENT_MAX_INITIAL_FAILURES=" in err
    assert warned == bool(sweep_id)


# --- mixed precision ------------------------------------------------------------------------------

@pytest.mark.parametrize("option, launcher, cuda, expected", [
    ("auto", None, False, "no"), ("auto", None, True, "bf16"),
    ("auto", "fp16", True, "fp16"), ("auto", "bf16", False, "bf16"), ("auto", "no", True, "no"),
    ("no", "bf16", True, "no"), ("bf16", "no", False, "bf16")])
def test_auto_precision_follows_the_launcher_and_an_explicit_option_wins(monkeypatch, option, launcher, cuda,
                                                                         expected):
    monkeypatch.delenv(train.LAUNCHER_PRECISION_ENV, raising=False)
    if launcher:
        monkeypatch.setenv(train.LAUNCHER_PRECISION_ENV, launcher)
    assert train.mixed_precision(option, cuda) == expected


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one AcceleratorState per process; these tests need another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_the_accelerator_gets_the_launchers_precision(tmp_path, monkeypatch, capsys, fresh_accelerate):
    from accelerate.state import AcceleratorState

    offline(monkeypatch, **{train.LAUNCHER_PRECISION_ENV: "bf16"})
    cfg = TrainConfig(results_dir=str(tmp_path))
    assert train.Run(cfg).accelerator.mixed_precision == "bf16"
    AcceleratorState._reset_state(True)
    cfg = TrainConfig(results_dir=str(tmp_path), mixed_precision="no")
    assert train.Run(cfg).accelerator.mixed_precision == "no"
    assert "--mixed_precision=no overrides the launcher's bf16" in capsys.readouterr().err
    AcceleratorState._reset_state(True)
    monkeypatch.setenv(train.LAUNCHER_PRECISION_ENV, "fp8")
    with pytest.raises(ConfigError, match="launcher's mixed precision 'fp8'"):
        train.Run(TrainConfig(results_dir=str(tmp_path)))


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False), (None, True)])
def test_only_the_main_process_prints_the_error_line(monkeypatch, capsys, rank, says):
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert train.main(["--attention=no_such_variant"]) == record.EXIT_CODES["config"]
    err = capsys.readouterr().err
    assert err.startswith("error: unknown attention variant") if says else err == ""


# --- local_sweep's hyperband stop, with the real train.py -------------------------------------------

def test_a_run_local_sweeps_hyperband_stops_ends_stopped_with_exit_0(tmp_path, corpus):
    """Two runs from one init (seed 0), val/loss every step: lr=0.01 learns, lr=0 keeps its initial
    loss. Hyperband (min_iter 2, eta 3) at band 2: threshold = the first run's loss at step 2,
    below the second's constant loss: the second is stopped, through the stop file + SIGTERM.
    (local_sweep polls the running run's W&B file once a second: 300 steps with 8 evaluation
    batches each keep the run going long enough to be seen on an idle machine, where 60 steps of
    one batch ended before the first poll.)"""
    constants = {"attention": "baseline", "seed": 0, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                 "n_experts": 4, "top_k": 2, "seq_len": 32, "batch_size": 4, "steps": 300, "eval_every": 1,
                 "eval_batches": 8, "warmup_steps": 0, "dataset": str(corpus), "cache_dir": str(tmp_path / "cache")}
    sweep = tmp_path / "hb.yaml"
    sweep.write_text(yaml.safe_dump({
        "program": str(ROOT / "train.py"), "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
        "parameters": {"lr": {"values": [0.01, 0.0]}, **{k: {"value": v} for k, v in constants.items()}}}))
    results = tmp_path / "results"
    result = processes.run([sys.executable, str(ROOT / "local_sweep.py"), str(sweep), "--results-dir",
                                          str(results), "--no-report"], cwd=ROOT, env=offline_env(),
                                         capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = [p for p in results.iterdir() if (p / "sweep_state.json").exists()]
    learns, flat = json.loads((sweep_dir / "sweep_state.json").read_text())["runs"]
    assert learns["status"] == "finished"
    assert (flat["status"], flat["exit_code"]) == ("stopped", 0), flat
    assert "hyperband" in flat["error"]
    saved = json.loads(Path(flat["record"]).read_text())
    assert saved["status"] == "stopped" and len(saved["history"]) < constants["steps"]
    assert (sweep_dir / "wandb" / f"sweep-{sweep_dir.name}" / f"stop-{flat['id']}").exists()
    assert not any((results / sweep_dir.name / "checkpoints").glob("*"))
    (run_dir,) = (sweep_dir / "wandb").glob(f"offline-run-*-{flat['id']}")
    logged = offline_run_contents(run_dir)
    assert logged["exit_code"] == 0 and logged["summary"]["status"] == "stopped"  # synced: finished, not failed


def test_no_checkpoint_artifact_means_a_fresh_start_and_a_failed_download_is_an_error(tmp_path):
    import wandb

    class Missing:
        offline = False

        def use_artifact(self, name, type=None):
            raise ValueError(f"artifact membership {name!r} not found")  # what wandb 0.31 raises

    class Broken(Missing):
        def use_artifact(self, name, type=None):
            class Artifact:
                def download(self, root):
                    raise OSError("connection reset")
            return Artifact()

    tracker = train.Tracker.__new__(train.Tracker)
    tracker.wandb = wandb
    tracker.run = Missing()
    assert tracker.restore_checkpoint("abcd", tmp_path / "ckpt") is False
    tracker.run = Broken()
    with pytest.raises(OSError, match="connection reset"):  # the run fails with the reason, not silently
        tracker.restore_checkpoint("abcd", tmp_path / "ckpt")
    tracker.run = type("OfflineRun", (), {"offline": True})()
    assert tracker.restore_checkpoint("abcd", tmp_path / "ckpt") is False  # W&B cannot fetch offline


# --- asking the agent's server whether it stopped the run -------------------------------------------

class FakeApi:
    """wandb.Api as server_stopped uses it: the agent's own GraphQL call, answering `answer`."""
    answer, delay_s, asked = None, 0.0, []

    def __init__(self, timeout=None):
        self._service_api = self

    def execute_graphql(self, query, variables=None, timeout=None):
        FakeApi.asked.append((query.split("(")[0].split()[-1], variables))
        time.sleep(FakeApi.delay_s)
        return FakeApi.answer


@pytest.mark.parametrize("answer, expected", [
    ({"project": {"run": {"stopped": True}}}, True), ({"project": {"run": {"stopped": False}}}, False),
    ({"project": {"run": None}}, None), ({"project": None}, None)])
def test_the_servers_answer_about_a_stop(monkeypatch, answer, expected):
    import wandb

    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.answer, FakeApi.delay_s, FakeApi.asked = answer, 0.0, []
    assert train.server_stopped("abcd1234", "attnsweep") is expected
    assert FakeApi.asked == [("RunStoppedStatus", {"projectName": "attnsweep", "entityName": "team", "runId": "abcd1234"})]


def test_a_server_that_does_not_answer_in_time_is_no_answer(monkeypatch):
    """wandb retries a lost network for minutes; a preempted run has seconds to write its record."""
    import wandb

    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.answer, FakeApi.delay_s = {"project": {"run": {"stopped": True}}}, 3.0
    started = time.perf_counter()
    assert train.server_stopped("abcd1234", "attnsweep", timeout_s=0.3) is None
    assert time.perf_counter() - started < 2.0
