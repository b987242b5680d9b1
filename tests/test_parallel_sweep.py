"""local_sweep.py --parallel N: N runs in flight at once, each its own process, W&B run and record
with max(1, cores // N) threads, as N agents on one machine; the engine sees the runs in flight (a
grid point is handed out once), hyperband judges every run in flight, Ctrl-C stops them all and
--resume continues them, a failed run is a result, and the runs' numbers are those of one by one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import processes
from localsweep import cli, engine, runner, state
from test_local_sweep import (calls, env, fake, only_sweep_dir, run_cli, run_hyperband_sweep,  # noqa: F401
                             state_of, write_sweep)  # (fake: a fixture)
from train_helpers import ROOT, TINY, offline_env, offline_run_contents, small_corpus

GRID = ["baseline", "lora_small", "rope_small", "bias_only"]
CORES = len(os.sched_getaffinity(0))  # what the sweep, started from here, may run on


def test_threads_per_run_share_the_cores():
    assert runner.threads_per_run(1, 2) is None  # one at a time: the environment's threads, as before
    assert [runner.threads_per_run(n, 2) for n in (2, 3, 4)] == [1, 1, 1]  # never below one
    assert [runner.threads_per_run(n, 16) for n in (2, 3, 4, 16)] == [8, 5, 4, 1]


def test_cores_are_the_cpus_this_process_may_run_on(monkeypatch):
    """On a 16-CPU machine with local_sweep.py pinned to one (taskset, a cgroup's cpuset): 1 core,
    and two at once get 1 thread each, not 8; without affinity (not Linux), the machine's CPUs."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert runner.cores() == 1 and runner.threads_per_run(2, runner.cores()) == 1
    monkeypatch.delattr(os, "sched_getaffinity")
    assert runner.cores() == 16 and runner.threads_per_run(2, runner.cores()) == 8


def test_a_bad_parallel_is_one_error_line(capsys):
    for value in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["x.yaml", "--parallel", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "--parallel" in err[0], err


# --- the engine sees the runs in flight --------------------------------------------------------------

def sweep_with(entries: list[dict]) -> state.Sweep:
    return state.Sweep(Path("/nonexistent"), {"sweep_id": "abc", "runs": [
        {"id": f"r{i}", "metrics": {}, **e} for i, e in enumerate(entries)]})


def test_a_grid_never_hands_out_a_point_that_is_in_flight():
    import sweeps

    config = {"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
              "parameters": {"attention": {"values": ["a", "b", "c"]}}}
    in_flight = sweep_with([{"params": {"attention": "a"}, "status": "running"},
                            {"params": {"attention": "b"}, "status": "pending"}])
    runs = engine.engine_runs(in_flight, "val/loss")
    assert [r.state for r in runs] == ["running", "pending"]
    assert sweeps.next_run(config, runs).config["attention"]["value"] == "c"
    done = sweep_with([{"params": {"attention": v}, "status": "running"} for v in "abc"])
    assert sweeps.next_run(config, engine.engine_runs(done, "val/loss")) is None  # the grid is handed out


def test_bayes_is_shown_a_run_in_flight_as_one_in_flight():
    """W&B's bayes fits its model to the runs that ended and takes a run in flight (`running`) as
    a point being tried (current_X): it predicts that run's metric and treats it as seen, so the
    next suggestion is not the one without it -- as several agents online would be given."""
    import numpy as np
    import sweeps
    from sweeps import bayes_search

    config = {"method": "bayes", "metric": {"name": "val/loss", "goal": "minimize"},
              "parameters": {"lr": {"min": 0.0, "max": 1.0}}}
    sweep = sweep_with([{"params": {"lr": 0.1}, "status": "finished", "metrics": {"val/loss": 3.0}},
                        {"params": {"lr": 0.9}, "status": "finished", "metrics": {"val/loss": 4.0}},
                        {"params": {"lr": 0.5}, "status": "running"}])
    runs = engine.engine_runs(sweep, "val/loss")
    _, sample_X, current_X, y, _ = bayes_search._construct_gp_data(
        runs, bayes_search.bayes_baseline_validate_and_fill(config))
    assert sample_X[:, 0].tolist() == pytest.approx([0.1, 0.9]) and y.tolist() == [3.0, 4.0]
    assert current_X.shape == (1, 1) and current_X[0, 0] == pytest.approx(0.5)  # in flight: lr 0.5 (uniform on [0, 1])
    saved = np.random.get_state()
    try:
        suggested = []
        for shown in (runs, runs[:2]):  # the same random candidates, with and without it in flight
            np.random.seed(0)
            suggested.append(sweeps.next_run(config, shown).config["lr"]["value"])
    finally:
        np.random.set_state(saved)
    assert suggested[0] != suggested[1], suggested


def test_hyperband_judges_each_run_in_flight_against_the_others(monkeypatch):
    """Two runs in flight, min_iter=2, eta=3: at band 2 the threshold over {a: 5, b: 9} is
    sorted([5, 9])[int(2/3)] = 5; b's best so far, 9, is above it, a's, 5, is not: b alone stops."""
    histories = {"a": [10, 5], "b": [10, 9], "c": [10, 4]}
    monkeypatch.setattr(engine, "run_history", lambda wandb_dir, run_id: [
        {"_step": i + 1, "val/loss": v} for i, v in enumerate(histories[run_id])])
    config = {"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
              "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
              "parameters": {"attention": {"values": ["x", "y"]}}}
    sweep = state.Sweep(Path("/nonexistent"), {"sweep_id": "abc", "runs": [
        {"id": rid, "params": {"attention": rid}, "status": "running", "metrics": {}} for rid in ("a", "b")]})
    stops = engine.early_stopper(sweep, config, "val/loss")
    assert stops(sweep.runs) == {"b"}
    assert "Band: 2" in sweep.runs[1]["stop_reason"] and "stop_reason" not in sweep.runs[0]
    assert [row["val/loss"] for row in sweep.runs[0]["metric_history"]] == [10, 5]  # read while running
    # a third run in flight, better than both: the threshold is now sorted([5, 9, 4])[1] = 5 -- a stays
    sweep.runs.append({"id": "c", "params": {"attention": "c"}, "status": "running", "metrics": {}})
    assert stops(sweep.runs) == {"b"}


HYPERBAND = {"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
             "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
             "parameters": {"attention": {"values": ["x", "y"]}}}


def test_hyperband_judges_a_run_at_every_band_it_passed_between_two_checks(monkeypatch):
    """What failed the two-at-once end-to-end test (a trace of it, 2026-12-02): baseline ended
    after 4 evaluations ([10, 5, 4, 3]); the first check that saw rope_only's live history saw 9
    evaluations, past band 6, where no other run has a value. W&B's engine judges a run at the
    latest band it reached only, so there the threshold is rope_only's own 9 and it ran on. A check
    at each evaluation would have stopped it at band 2 (threshold sorted([5, 9])[int(2/3)] = 5 < 9):
    judged at every band it passed since the last check, it is stopped there, whenever the check
    comes."""
    import sweeps

    rope = [10, 9] + [9] * 7
    monkeypatch.setattr(engine, "run_history", lambda wandb_dir, run_id: [
        {"_step": i + 1, "val/loss": v} for i, v in enumerate(rope)])
    sweep = state.Sweep(Path("/nonexistent"), {"sweep_id": "abc", "runs": [
        {"id": "base", "params": {"attention": "x"}, "status": "finished", "metrics": {"val/loss": 3},
         "metric_history": [{"step": i + 1, "val/loss": v} for i, v in enumerate([10, 5, 4, 3])]},
        {"id": "rope", "params": {"attention": "y"}, "status": "running", "metrics": {},
         "metric_history": [{"step": i + 1, "val/loss": v} for i, v in enumerate(rope)]}]})
    assert sweeps.stop_runs(HYPERBAND, engine.engine_runs(sweep, "val/loss")) == []  # the latest band only
    stops = engine.early_stopper(sweep, HYPERBAND, "val/loss")
    assert stops([sweep.runs[1]]) == {"rope"}
    assert "Step: 2 (Band: 2 Metric: 9 Threshold: 5)" in sweep.runs[1]["stop_reason"]


def test_a_band_a_run_passed_between_two_checks_is_judged_once(monkeypatch):
    """As a check at each evaluation would: a run that passed band 2 between two checks (alone:
    threshold its own 8) is not judged again at band 2 against a better run that reached it later
    (c: 4 there, which would put a's 8 above the threshold sorted([4, 8])[0] = 4); its latest band,
    6, W&B's engine judges at every check: once d reaches it (3 there), a's 8 is above the
    threshold sorted([3, 8])[0] = 3, and a is stopped at band 6."""
    live = {"a": [10, 8, 8, 8, 8, 8, 8], "c": [10, 4], "d": [10, 4, 3, 3, 3, 3]}
    monkeypatch.setattr(engine, "run_history", lambda wandb_dir, run_id: [
        {"_step": i + 1, "val/loss": v} for i, v in enumerate(live[run_id])])
    sweep = state.Sweep(Path("/nonexistent"), {"sweep_id": "abc", "runs": [
        {"id": "a", "params": {"attention": "x"}, "status": "running", "metrics": {}}]})
    stops = engine.early_stopper(sweep, HYPERBAND, "val/loss")
    assert stops(sweep.runs) == set()
    sweep.runs.append({"id": "c", "params": {"attention": "y"}, "status": "running", "metrics": {}})
    assert stops(sweep.runs) == set()  # a: band 6, where only a has a value; c: band 2, below a
    sweep.runs.append({"id": "d", "params": {"attention": "x"}, "status": "running", "metrics": {}})
    assert stops(sweep.runs) == {"a"}  # its latest band again, now with d there
    assert "Band: 6" in sweep.runs[0]["stop_reason"]


def test_hyperband_stops_the_run_in_flight_that_falls_behind_the_one_beside_it(tmp_path):
    """The same two curves as the one-by-one test (test_local_sweep), now side by side, read from
    the running runs' W&B files: rope_only (9 from its second evaluation on) is stopped while
    baseline, beside it, is still running -- baseline keeps its W&B run open until rope_only has
    ended (FAKE_WAIT_FOR), so only baseline's live history can have put rope_only behind: alone,
    or against finished runs only, rope_only's threshold is its own value and it would log all 100
    steps (20 s). Robust by construction, not by timing: baseline passes every band rope_only can
    be at within its first second (5 at band 2, 3 at bands 6 and 18, each below rope_only's 9: the
    threshold over the two is baseline's value), and a band rope_only passed between two checks is
    still judged; so however late one of them starts, and whenever a check comes, rope_only is
    stopped at one of them -- unless baseline were 10 s later than it, past band 54."""
    result, sweep_dir = run_hyperband_sweep(tmp_path, "--parallel", 2, FAKE_WAIT_FOR="rope_only")
    first, second = state_of(sweep_dir)["runs"]
    assert (first["name"], first["status"]) == ("baseline-s0", "finished")
    assert (second["name"], second["status"]) == ("rope_only-s0", "stopped")
    assert "hyperband" in second["error"]
    assert any(f"(Band: {band} Metric: 9 Threshold: {threshold})" in second["error"]
               for band, threshold in ((2, 5), (6, 3), (18, 3))), second["error"]
    assert 2 <= len(second["metric_history"]) < 100  # stopped before its end
    spans = {row["attention"]: row for row in map(json.loads, (tmp_path / "fake" / "ends.jsonl").read_text().splitlines())}
    baseline, rope_only = spans["baseline"], spans["rope_only"]
    assert baseline["start"] < rope_only["end"] < baseline["end"]  # stopped while baseline was running
    # (not the order of the two lines printed: baseline ends right after rope_only, and which end the
    # sweep reaps first is a race -- the fresh-clone suite, idle, printed baseline's first once)
    assert "[2/2] rope_only-s0  stopped" in result.stdout and "[1/2] baseline-s0  finished" in result.stdout


def test_a_stop_from_hyperband_reaches_only_the_run_it_names(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with processes.started(sleep) as a, processes.started(sleep) as b:
        flight = runner.Flight()
        for name, proc in (("a", a), ("b", b)):
            launch = runner.Launch({"name": name, "id": name}, name, log_file=None, stop_file=tmp_path / f"stop-{name}")
            launch.proc = proc
            flight.runs.append(launch)
        asked = []
        started = time.monotonic()
        ended = flight.wait(lambda entries: (asked.append([e["id"] for e in entries]), {"b"})[1])
        assert time.monotonic() - started < 20
        assert [launch.entry["id"] for launch in ended] == ["b"]
        assert ended[0].rc == -signal.SIGTERM and ended[0].early and (tmp_path / "stop-b").exists()
        assert a.poll() is None and not flight.runs[0].early and not (tmp_path / "stop-a").exists()
        assert asked[0] == ["a", "b"]  # both in flight were put to the engine
        assert flight.stopped_by is None


def test_a_signal_during_a_start_waits_until_the_run_is_in_flight():
    with processes.terminal_signals():
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with runner.signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler would have raised here
                reached.append("end of the block")
        assert reached == ["end of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# --- the run loop, with the fake program ------------------------------------------------------------

def intervals(program: Path) -> dict[int, tuple[float, float]]:
    """{pid: (start, end)} of each run of the fake program."""
    starts = {c["pid"]: c["t"] for c in calls(program)}
    ends = [json.loads(line) for line in (program.parent / "ends.jsonl").read_text().splitlines()]
    return {e["pid"]: (starts[e["pid"]], e["t"]) for e in ends}


def most_at_once(spans) -> int:
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


def test_two_at_once_each_point_once_and_a_failure_is_a_result(tmp_path, fake):
    sweep = write_sweep(tmp_path / "grid.yaml", fake, {"attention": {"values": GRID}, "seed": {"value": 0}})
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--no-report", "--parallel", 2,
                     FAKE_HOLD_S="1", FAKE_FAIL="lora_small", FAKE_CRASH="rope_small")
    assert result.returncode == 0, result.stdout + result.stderr  # failed runs are results, not errors
    out = result.stdout
    made = calls(fake)
    assert sorted(c["argv"][0] for c in made) == sorted(f"--attention={v}" for v in GRID)  # each point once
    assert len({c["pid"] for c in made}) == 4 and len({c["env"]["WANDB_RUN_ID"] for c in made}) == 4
    spans = intervals(fake)
    assert len(spans) == 4 and most_at_once(spans.values()) == 2  # two in flight, never three
    threads = str(max(1, CORES // 2))
    assert all(c["env"]["OMP_NUM_THREADS"] == threads == c["env"]["MKL_NUM_THREADS"] for c in made)
    assert f"(grid, 4 runs, 2 at once, {threads} thread" in out

    sweep_dir = only_sweep_dir(results)
    saved = state_of(sweep_dir)
    runs = {r["name"]: r for r in saved["runs"]}
    assert {n: r["status"] for n, r in runs.items()} == {"baseline-s0": "finished", "lora_small-s0": "failed",
                                                         "rope_small-s0": "failed", "bias_only-s0": "finished"}
    assert runs["lora_small-s0"]["error"] == "injected failure for lora_small"
    assert "RuntimeError: crashed before writing a record" in runs["rope_small-s0"]["error"]
    assert [r["index"] for r in saved["runs"]] == [1, 2, 3, 4] and saved["complete"] is True
    assert all(r["threads"] == int(threads) for r in saved["runs"])
    # readable: every line about a run names it, and each run's log holds its own output only
    for name, entry in runs.items():
        assert f"] {name}  started" in out and f"] {name}  {entry['status']}" in out
        log = Path(entry["log"]).read_text()
        assert f"fake training {name}" in log
        assert not [other for other in runs if other != name and f"fake training {other}" in log]
    assert "(injected failure for lora_small)" in out


def test_bayes_runs_two_at_once_to_its_count(tmp_path, fake):
    sweep = write_sweep(tmp_path / "bayes.yaml", fake, {
        "attention": {"values": ["baseline", "rope_small"]}, "lr": {"min": 0.0001, "max": 0.01}}, method="bayes")
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--no-report", "--parallel", 2, "--count", 4, FAKE_HOLD_S="0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    saved = state_of(only_sweep_dir(results))
    assert len(saved["runs"]) == 4 and all(r["status"] == "finished" for r in saved["runs"])
    assert len({r["params"]["lr"] for r in saved["runs"]}) == 4
    assert most_at_once(intervals(fake).values()) == 2


def test_the_metric_target_ends_the_hand_out_and_the_runs_in_flight_finish(tmp_path, fake):
    """The fake's val/loss is 3.0 + len(attention)/10: baseline 3.8 reaches the target 3.85, the
    others (3.9, 3.9, 4.0) do not. Two at once: baseline (0.2 s) and rope_only (1.5 s) start;
    baseline ends first, reaching the target while rope_only is in flight: no run takes the free
    slot, and rope_only, not stopped, finishes with its whole history."""
    sweep = write_sweep(tmp_path / "target.yaml", fake, {
        "attention": {"values": ["baseline", "rope_only", "bias_only", "lora_small"]}, "seed": {"value": 0}},
        metric={"name": "val/loss", "goal": "minimize", "target": 3.85})
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--no-report", "--parallel", 2,
                     FAKE_HOLD_S="1.5", FAKE_HOLD_S_BASELINE="0.2")
    assert result.returncode == 0, result.stdout + result.stderr
    saved = state_of(only_sweep_dir(results))
    made = calls(fake)
    assert [c["argv"][0] for c in made] == ["--attention=baseline", "--attention=rope_only"]
    spans = intervals(fake)
    baseline_end = spans[made[0]["pid"]][1]
    rope_start, rope_end = spans[made[1]["pid"]]
    assert rope_start < baseline_end < rope_end  # in flight when baseline reached the target
    baseline, rope_only = saved["runs"]
    assert saved["target_reached_by"] == baseline["id"]
    assert (rope_only["status"], rope_only["exit_code"], rope_only["metrics"].get("val/loss")) == ("finished", 0, 3.9)
    assert rope_only["metric_history"] == [{"step": 1, "val/loss": 3.9}]  # all of it: it ran to its end
    assert "reached the metric target val/loss=3.85" in result.stdout


def test_ctrl_c_stops_every_run_in_flight_and_resume_continues_them(tmp_path, fake):
    sweep = write_sweep(tmp_path / "grid.yaml", fake, {"attention": {"values": GRID[:3]}, "seed": {"value": 0}})
    results = tmp_path / "results"
    holding = fake.parent / "holding"
    with processes.started([sys.executable, str(ROOT / "local_sweep.py"), str(sweep), "--results-dir",
                            str(results), "--no-report", "--parallel", "2"], cwd=ROOT, env=env(FAKE_HOLD_S="60"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.time() + 60
        while len(list(holding.glob("*"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert len(list(holding.glob("*"))) == 2, "two runs never were in flight"
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert "SIGINT: stopping baseline-s0, lora_small-s0 (each saves a checkpoint" in out
    sweep_dir = only_sweep_dir(results)
    (hint,) = [line for line in out.splitlines() if line.startswith("continue with: ")]
    assert hint.startswith(f"continue with: python local_sweep.py {sweep} --resume {sweep_dir.name}")
    assert hint.endswith(" --parallel 2")
    saved = state_of(sweep_dir)
    assert [(r["name"], r["status"]) for r in saved["runs"]] == [("baseline-s0", "interrupted"),
                                                                  ("lora_small-s0", "interrupted")]
    for name in ("baseline-s0", "lora_small-s0"):  # each stopped cleanly: its own record says so
        assert json.loads((sweep_dir / f"{name}.json").read_text())["status"] == "interrupted"
    assert len(calls(fake)) == 2  # the third never started
    interrupted_ids = [r["id"] for r in saved["runs"]]

    resumed = run_cli("--resume", sweep_dir, "--no-report", "--parallel", 2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    saved = state_of(sweep_dir)
    assert [r["status"] for r in saved["runs"]] == ["finished"] * 3
    assert [r["id"] for r in saved["runs"][:2]] == interrupted_ids  # the same runs: they resume their checkpoints
    assert sorted(c["argv"][0] for c in calls(fake)[2:]) == sorted(f"--attention={v}" for v in GRID[:3])


# --- train.py itself: the numbers are those of one by one --------------------------------------------

# local_sweep's command line with train.main wrapped: each run notes its torch threads, its
# environment's and the pipes and sweep logs it holds, then trains as usual, and notes when it
# started and ended training.
WRAPPER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import torch, train
    real_main = train.main

    def main(args):
        name = "-s".join(dict(a[2:].split("=", 1) for a in args if "=" in a)[k] for k in ("attention", "seed"))
        held = {{}}
        for fd in os.listdir("/proc/self/fd"):
            try:
                held[fd] = os.readlink(f"/proc/self/fd/{{fd}}")
            except OSError:
                pass
        marker = Path({markers!r}) / name
        marker.write_text(json.dumps({{
            "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "stdout": held.get("1"),
            "held": sorted(set(held.values())), "start": time.time()}}))
        try:
            return real_main(args)
        finally:
            marker.with_suffix(".end").write_text(str(time.time()))

    train.main = main
    from localsweep.cli import main as cli
    sys.exit(cli(sys.argv[1:]))
''')


def test_two_at_once_give_the_same_runs_as_one_by_one(tmp_path):
    """A tiny 4-run grid, forked from train.py, one by one and two at once at the same thread count:
    the same configurations, each run's losses bit for bit and the same report content."""
    values = {**TINY, "dataset": str(small_corpus(tmp_path)), "cache_dir": str(tmp_path / "cache")}
    sweep = write_sweep(tmp_path / "tiny.yaml", "train.py", {
        "attention": {"values": ["baseline", "rope_small"]}, "seed": {"values": [0, 1]},
        **{k: {"value": v} for k, v in values.items()}})
    markers = tmp_path / "markers"
    markers.mkdir()
    wrapper = tmp_path / "wrapped_local_sweep.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), markers=str(markers)))
    records, reports = {}, {}
    for n in (1, 2):
        # one by one at the thread count two at once gives each run (the numbers are a thread
        # count's: docs/PERF.md); two at once under a sweep started with more threads than each run
        # gets (torch takes min(CORES + 1, cores) in the sweep's own process): the runs must set theirs
        each = str(max(1, CORES // 2)) if n == 1 else str(CORES + 1)
        threads = {"OMP_NUM_THREADS": each, "MKL_NUM_THREADS": each}
        done = processes.run([sys.executable, str(wrapper), str(sweep), "--results-dir", str(tmp_path / f"n{n}"),
                              "--parallel", str(n)], cwd=ROOT, env=offline_env(**threads), capture_output=True,
                             text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        sweep_dir = only_sweep_dir(tmp_path / f"n{n}")
        saved = state_of(sweep_dir)
        assert [(r["status"], r["started_as"]) for r in saved["runs"]] == [("finished", "fork")] * 4
        records[n] = {r["name"]: json.loads(Path(r["record"]).read_text()) for r in saved["runs"]}
        for entry in saved["runs"]:  # each its own W&B run, ended with its exit code
            (run_dir,) = (sweep_dir / "wandb").glob(f"offline-run-*-{entry['id']}")
            assert offline_run_contents(run_dir)["exit_code"] == 0
        reports[n] = json.loads((sweep_dir / "report" / "architecture_search_results.json").read_text())
        seen = {name: json.loads((markers / name).read_text()) for name in records[n]}
        if n == 2:
            assert all(s["threads"] == max(1, CORES // 2) and s["omp"] == str(max(1, CORES // 2)) for s in seen.values())
            # the second run was forked while the first was in flight: it holds neither the first
            # one's pipe nor any run's log (a killed sweep would leave the first writing into a pipe)
            first, second = seen["baseline-s0"], seen["baseline-s1"]
            assert first["stdout"].startswith("pipe:") and first["stdout"] not in second["held"]
            assert not [p for s in seen.values() for p in s["held"] if p.endswith(".log")]
            # and two at once they were: some run started training before another had ended
            spans = [(s["start"], float((markers / f"{name}.end").read_text())) for name, s in seen.items()]
            assert most_at_once(spans) == 2, spans

    assert sorted(records[1]) == sorted(records[2]) == ["baseline-s0", "baseline-s1", "rope_small-s0",
                                                        "rope_small-s1"]
    for name in records[1]:
        one, two = records[1][name], records[2][name]
        assert ({k: v for k, v in one["config"].items() if k not in ("results_dir", "group")} ==
                {k: v for k, v in two["config"].items() if k not in ("results_dir", "group")})
        assert one["summary"]["val/loss"] == two["summary"]["val/loss"], name  # bit for bit
        for key in ("data/fingerprint", "init/shared_fingerprint", "val/accuracy", "val/context_gain"):
            assert one["summary"][key] == two["summary"][key], (name, key)
        assert [{k: v for k, v in row.items() if "loss" in k} for row in one["history"]] == \
               [{k: v for k, v in row.items() if "loss" in k} for row in two["history"]], name
    content = ("val_loss", "val_losses", "val_accuracies", "loss_curve", "data_fingerprint", "init_fingerprint",
               "parameter_count", "flops_per_token", "status")
    assert {k: {f: v.get(f) for f in content} for k, v in reports[1].items()} == \
           {k: {f: v.get(f) for f in content} for k, v in reports[2].items()}
