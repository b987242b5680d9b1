"""The real `wandb sweep` and `wandb agent` programs (wandb 0.31.0) driving train.py against a W&B
server stand-in on 127.0.0.1 (tests/wandb_standin.py, runs handed out by W&B's own `sweeps`
engine): a grid finishes with the records and exit codes README's "How a run ends" table gives;
the server's stop ends a run `stopped`, exit 0, online and offline; a preempted run handed out
again under its id resumes from its checkpoint to exactly the uninterrupted losses; quick failures
make the agent give up, and exit 0. Each test is a few tiny runs. The agent is wandb's own code
with one constant changed: it asks the server for commands every second instead of every 5 s
(AGENT below), which takes about 10 s off each test and leaves what the runs do as it was.
Skipped, with the reason, only where the wandb CLI is missing."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import processes
from train_helpers import ROOT, TINY, offline_run_when_ended, small_corpus
from wandb_standin import ENTITY, StandIn

WANDB_CLI = shutil.which("wandb", path=str(Path(sys.executable).parent)) or shutil.which("wandb")
pytestmark = pytest.mark.skipif(WANDB_CLI is None, reason="the wandb CLI (pip install wandb==0.31.0) is not "
                                                          "installed: the real agent cannot be run")
PROJECT = "attnsweep"
FAKE_KEY = "f" * 40  # W&B's key format; the stand-in accepts any
AGENT_TIMEOUT_S = 240
# `wandb agent` as the wandb script runs it (wandb/cli/cli.py), with Agent.POLL_INTERVAL at 1 s: the
# agent's loop waits POLL_INTERVAL between heartbeats (wandb_agent.py, 5 s), so every hand-out, stop
# and exit the server sends, and every ended run the agent notices, waited up to 5 s. Nothing the
# tests check depends on it: the give-up rule counts failures in the agent's first 60 s of wall
# time, which a faster loop only makes easier to reach on a slow machine.
AGENT = ("import sys, wandb.wandb_agent; wandb.wandb_agent.Agent.POLL_INTERVAL = 1; "
         "from wandb.cli.cli import cli; sys.argv[0] = 'wandb'; sys.exit(cli())")


def run_logged(argv, env, cwd, log: Path, timeout: float) -> int:
    """One CLI command, its output appended to `log`; tests/processes.py owns it and everything it
    starts (the agent's runs, wandb-core) and kills them when it ends, however it ends."""
    with open(log, "ab") as out:
        try:
            return processes.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(map(str, argv[:3]))} ran past {timeout} s; its output: "
                        f"{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def server():
    with StandIn() as standin:
        yield standin


def user_env(tmp: Path, server: StandIn, **extra) -> dict:
    """A W&B user's shell on a fresh machine, logged in to the stand-in: a private HOME and W&B
    directories, no WANDB_DIR (the agent sets it), a fake key that is never printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    for name in ("home", "config", "cache", "data", "agent"):
        (tmp / name).mkdir(exist_ok=True)
    env.update(HOME=str(tmp / "home"), WANDB_CONFIG_DIR=str(tmp / "config"), WANDB_CACHE_DIR=str(tmp / "cache"),
               WANDB_DATA_DIR=str(tmp / "data"), WANDB_BASE_URL=server.url, WANDB_API_KEY=FAKE_KEY,
               PYTHONUNBUFFERED="1", **extra)
    # the user's venv activated: the agent runs a sweep's program as `python train.py ...` from PATH,
    # so with the suite started as <venv>/bin/python -m pytest (no activation) PATH must name it
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def sweep_and_agent(tmp: Path, server: StandIn, corpus: Path, parameters: dict,
                    program: Path = ROOT / "train.py", **env) -> tuple[int, str, str]:
    """`wandb sweep` a grid of tiny runs, then `wandb agent` it to the end, from a directory of its
    own (where the agent would put its ./wandb); returns (the agent's exit code, its output and its
    runs', the sweep id)."""
    values = {**TINY, "dataset": str(corpus), "cache_dir": str(tmp / "tokens"), "results_dir": str(tmp / "results")}
    config = {"program": str(program), "method": "grid", "project": PROJECT,
              "parameters": {**{k: {"value": v} for k, v in values.items()}, **parameters}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(config))
    environment, log = user_env(tmp, server, **env), tmp / "agent.log"
    code = run_logged([WANDB_CLI, "sweep", str(tmp / "sweep.yaml")], environment, tmp / "agent", log, 120)
    assert code == 0 and len(server.sweeps) == 1, log.read_text(errors="replace")
    (sweep_id,) = server.sweeps
    code = run_logged([sys.executable, "-c", AGENT, "agent", f"{ENTITY}/{PROJECT}/{sweep_id}"], environment,
                      tmp / "agent", log, AGENT_TIMEOUT_S)
    output = log.read_text(errors="replace")
    assert FAKE_KEY not in output
    assert not server.unknown or all(kind == "GET" for kind, *_ in server.unknown), server.unknown
    return code, output, sweep_id


def records_by_id(results: Path) -> dict:
    return {r["run_id"]: r for r in (json.loads(p.read_text()) for p in results.glob("*.json"))}


def test_a_grid_finishes_and_the_servers_stop_ends_an_online_run_stopped(tmp_path, server, corpus):
    """Online children: run 1 finishes (exit 0), run 2, stopped by the server while it trains,
    ends `stopped`, exit 0, its checkpoint gone; W&B's side got the same statuses and exit codes.
    Its W&B files are under results/<sweep_id>/, not the agent's ./wandb."""
    server.stop_when[2] = lambda run: run.state == "running"  # its wandb.init reached the server
    code, output, sweep_id = sweep_and_agent(tmp_path, server, corpus,
                                             {"steps": {"values": [6, 100000]}, "eval_every": {"value": 3}})
    assert code == 0, output[-3000:]
    first, second = (server.runs[run_id] for run_id in server.handed_out)
    records = records_by_id(tmp_path / "results" / sweep_id)
    assert set(records) == {first.id, second.id}
    assert records[first.id]["status"] == "finished" and [r["step"] for r in records[first.id]["history"]] == list(range(1, 7))
    assert (first.state, first.exitcode, first.summary["status"]) == ("finished", 0, "finished")
    # what W&B's server received is what the record says, step by step
    logged = {row["_step"]: row["train/loss"] for row in first.history}
    assert logged == {row["step"]: row["train/loss"] for row in records[first.id]["history"]}
    assert records[second.id]["status"] == "stopped" and records[second.id]["error"].startswith("stopped by the sweep")
    assert (second.state, second.exitcode, second.summary["status"]) == ("finished", 0, "stopped")
    assert ("graphql", "RunStoppedStatus") in {entry[:2] for entry in server.requests}
    assert not any((tmp_path / "results" / sweep_id / "checkpoints").glob("*"))
    assert len(list((tmp_path / "results" / sweep_id / "wandb").glob("run-*"))) == 2
    assert not list((tmp_path / "agent" / "wandb").glob("run-*"))


def test_offline_runs_live_under_results_and_the_servers_stop_ends_one_stopped(tmp_path, server, corpus):
    """Offline children (WANDB_MODE=offline), an online agent: the offline runs are under
    results/<sweep_id>/wandb/ (README's `wandb sync` line), not the agent's ./wandb; the server's
    stop ends a run `stopped`, exit 0 (train.py asks the server, which marked the run stopped
    before telling the agent), so the agent counts no failure."""
    sweep_dir = tmp_path / "results"
    # its wandb.init has begun (wherever its offline run went): train.py's signal handlers are in place
    server.stop_when[2] = lambda run: any(tmp_path.glob(f"**/offline-run-*-{run.id}"))
    code, output, sweep_id = sweep_and_agent(tmp_path, server, corpus,
                                             {"steps": {"values": [6, 100000]}, "eval_every": {"value": 3}},
                                             WANDB_MODE="offline")
    assert code == 0, output[-3000:]
    first, second = server.handed_out
    records = records_by_id(sweep_dir / sweep_id)
    assert (records[first]["status"], records[second]["status"]) == ("finished", "stopped"), output[-3000:]
    assert not list((tmp_path / "agent" / "wandb").glob("offline-run-*"))
    for run_id, status in ((first, "finished"), (second, "stopped")):
        (run_dir,) = (sweep_dir / sweep_id / "wandb").glob(f"offline-run-*-{run_id}")
        logged = offline_run_when_ended(run_dir)
        assert (logged["exit_code"], logged["summary"]["status"], logged["sweep_id"]) == (0, status, sweep_id)
    assert "failed runs" not in output


def test_a_preempted_run_is_handed_out_again_and_resumes_to_the_uninterrupted_losses(tmp_path, server,
                                                                                      corpus):
    """Online: the run with checkpoint_every=0 gets a SIGTERM during step 3 (a preemption, not the
    server's stop): it saves a checkpoint, is marked preempting and exits 130; the server hands
    the same run id out again, and the agent's new attempt resumes at step 3 and ends with exactly
    the losses of its twin with checkpoint_every=2 (the same training), which nothing interrupted.
    The interrupted run says what resumes it under the agent, not `--resume`."""
    code, output, sweep_id = sweep_and_agent(
        tmp_path, server, corpus, {"checkpoint_every": {"values": [0, 2]}, "steps": {"value": 8},
                                              "eval_every": {"value": 4}},
        program=ROOT / "tests" / "preempted_train.py", PREEMPT_AT_STEP="3", PREEMPT_MARKER=str(tmp_path / "preempted"))
    assert code == 0, output[-3000:]
    records = records_by_id(tmp_path / "results" / sweep_id)
    (preempted,) = [server.runs[i] for i in server.handed_out if server.runs[i].params["checkpoint_every"] == 0]
    (twin,) = [server.runs[i] for i in server.handed_out if server.runs[i].params["checkpoint_every"] == 2]
    assert (preempted.handed_out, preempted.state, preempted.exitcode) == (2, "finished", 0)
    assert ("file_stream", preempted.id, {"exitcode": 130, "complete": True}) in [
        (kind, name, {k: v for k, v in body.items() if k in ("exitcode", "complete")}) for kind, name, body in
        server.requests if kind == "file_stream" and body.get("complete")]
    assert "resuming baseline-s0 from its checkpoint at step 3" in output
    assert f"marked preempting: W&B hands run {preempted.id} out again" in output
    assert "continue with --resume" not in output
    mine, reference = records[preempted.id], records[twin.id]
    assert mine["status"] == reference["status"] == "finished"
    keys = ("step", "train/loss", "val/loss")
    assert [[row.get(k) for k in keys] for row in mine["history"]] == \
           [[row.get(k) for k in keys] for row in reference["history"]]
    assert mine["summary"]["data/fingerprint"] == reference["summary"]["data/fingerprint"]


def test_the_agent_gives_up_after_quick_failures_and_exits_0(tmp_path, server, corpus):
    """Every run of this grid is bad input (exit 2): the agent stops handing out runs after 3
    failures in its first 60 s (or, on a slow machine, 5 failures and no success), and exits 0
    all the same -- W&B's behaviour, which README's give-up paragraph warns a script about."""
    started = time.time()
    code, output, _ = sweep_and_agent(tmp_path, server, corpus,
                                      {"d_model": {"values": [33, 35, 37, 39, 41, 43]}}, WANDB_MODE="offline")
    assert code == 0
    assert len(server.handed_out) in (3, 5) and len(server.handed_out) < 6, output[-3000:]
    assert "failed runs in the first 60 seconds" in output or "failed runs in a row" in output
    assert output.count("error: --d_model=") == len(server.handed_out)
    assert time.time() - started < AGENT_TIMEOUT_S
