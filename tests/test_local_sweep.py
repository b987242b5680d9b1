"""local_sweep.py, the offline stand-in for `wandb agent`: the agent's contract (params file, command
macros) checked against wandb's own code, bad sweeps refused before any run, and the run loop --
failures, crashes, Ctrl-C, --resume -- driven with a small fake training program."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import processes
from localsweep import cli, common, engine, macros, state, table
from train_helpers import offline_run_contents

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for train.py: reads `--name=value`, WANDB_* and the thread counts, logs each call (and
# when each ends, in ends.jsonl), writes a record to <results_dir>/<group>/<attention>-s<seed>.json;
# fails, crashes or sleeps for chosen variants; with FAKE_HOLD_S every run first waits that long
# (FAKE_HOLD_S_<ATTENTION>, e.g. FAKE_HOLD_S_BASELINE, for that variant instead).
FAKE = textwrap.dedent('''
    import atexit, json, os, signal, sys, time
    from pathlib import Path

    here = Path(__file__).parent
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    with open(here / "calls.jsonl", "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "t": time.time(), "pid": os.getpid(),
                            "env": {k: v for k, v in os.environ.items()
                                    if k.startswith("WANDB_") or k.endswith("_NUM_THREADS")}}) + "\\n")
    attention, seed = args.get("attention", "baseline"), int(args.get("seed", 0))

    def ended():
        with open(here / "ends.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "t": time.time()}) + "\\n")

    atexit.register(ended)
    group = args.get("group") or os.environ.get("WANDB_RUN_GROUP") or "local"
    out = Path(args.get("results_dir", "results")) / group / f"{attention}-s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(status, error=None, loss=None):
        summary = {"status": status}
        if loss is not None:
            summary.update({"val/loss": loss, "val/accuracy": 0.25, "params/total": 2500000, "time/total_s": 1.5,
                            "memory/peak_gb": 0.125})
        obj = {"schema": 1, "run_id": os.environ.get("WANDB_RUN_ID"), "run_name": f"{attention}-s{seed}",
               "group": group, "attention": attention, "family": "x", "seed": seed, "status": status,
               "error": error, "config": args, "summary": summary,
               "history": [{"step": 1, "val/loss": loss}] if loss is not None else []}
        out.with_suffix(".tmp").write_text(json.dumps(obj))
        os.replace(out.with_suffix(".tmp"), out)

    def stop(signum, frame):
        record("interrupted", "stopped by a signal")
        sys.exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"fake training {attention}-s{seed}", flush=True)
    hold = float(os.environ.get(f"FAKE_HOLD_S_{attention.upper()}", os.environ.get("FAKE_HOLD_S", 0)))
    if hold:
        (here / "holding").mkdir(exist_ok=True)
        (here / "holding" / f"{attention}-s{seed}").write_text(str(os.getpid()))
        time.sleep(hold)
    if attention in os.environ.get("FAKE_FAIL", "").split(","):
        print(f"error: injected failure for {attention}", file=sys.stderr)
        record("failed", f"injected failure for {attention}")
        sys.exit(1)
    if attention in os.environ.get("FAKE_CRASH", "").split(","):
        raise RuntimeError("crashed before writing a record")
    if attention in os.environ.get("FAKE_SLEEP", "").split(",") and (here / "sleep_once").exists():
        (here / "sleep_once").unlink()
        (here / "sleeping").write_text("1")
        time.sleep(60)
    record("finished", loss=round(3.0 + len(attention) / 10 + seed / 100 + float(args.get("lr", 0)), 4))
''')


@pytest.fixture
def fake(tmp_path) -> Path:
    program = tmp_path / "fake" / "fake_train.py"
    program.parent.mkdir()
    program.write_text(FAKE)
    return program


def write_sweep(path: Path, program: Path, parameters: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"program": str(program), "method": "grid",
                                    "metric": {"name": "val/loss", "goal": "minimize"},
                                    "parameters": parameters, **extra}, sort_keys=False))
    return path


def calls(program: Path) -> list[dict]:
    path = program.parent / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE" and not k.startswith("FAKE_")}
    return {**base, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def run_cli(*args, timeout=120, **extra_env) -> subprocess.CompletedProcess:
    return processes.run([sys.executable, str(ROOT / "local_sweep.py"), *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def state_of(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep_state.json").read_text())


def only_sweep_dir(results: Path) -> Path:
    (sweep_dir,) = [p for p in results.iterdir() if (p / "sweep_state.json").exists()]
    return sweep_dir


# --- the agent's contract, against wandb's own code ----------------------------------------------

PARAMS = {"attention": "rope_small", "seed": 0, "lr": 0.0001, "attention_bias": False, "compile": True,
          "q_lora_rank": None, "dataset": "Hugging Face/with space", "steps": 50}


def test_argument_forms_match_wandbs_agent():
    from wandb.sdk.launch.sweeps import utils as wandb_utils

    theirs = wandb_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in PARAMS.items()}})
    ours = macros.sweep_command_args(PARAMS)
    for macro in ("args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json",
                  "args_append_hydra", "args_override_hydra"):
        assert ours[macro] == theirs[macro], macro
    assert ours["args"][:4] == ["--attention=rope_small", "--seed=0", "--lr=0.0001", "--attention_bias=False"]
    assert "--compile" in ours["args_no_boolean_flags"] and "--attention_bias" not in " ".join(
        ours["args_no_boolean_flags"])


def wandb_expansion(command, params, program, interpreter, json_file):
    """wandb/wandb_agent.py Agent._command_run's expansion, with wandb's own helpers."""
    from wandb.sdk.launch.sweeps import utils as wandb_utils

    sweep_command = wandb_utils.create_sweep_command(list(command) if command else None)
    sweep_vars = wandb_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update({"interpreter": [interpreter], "program": [program], "args_json_file": [json_file],
                       "env": ["/usr/bin/env"]})
    out = []
    for c in sweep_command:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            out += sweep_vars.get(c[2:-1]) or []
        else:
            out += [c]
    return out


@pytest.mark.parametrize("command", [
    None,  # the default: ${env} ${interpreter} ${program} ${args}
    ["${env}", "${interpreter}", "${program}", "${args}"],
    ["${env}", "accelerate", "launch", "--multi_gpu", "--num_processes=8", "${program}", "${args}"],
    ["${interpreter}", "${program}", "${args_no_hyphens}"],
    ["${env}", "${interpreter}", "${program}", "${args_no_boolean_flags}", "--extra", 3],
    ["${interpreter}", "${program}", "${args_json}"],
    ["${interpreter}", "${program}", "--config", "${args_json_file}"],
    ["${interpreter}", "${program}", "${unknown_macro}", "--x=${args}", "${args_no_equals}"],
    ["${env}", "${envvar:LOCAL_SWEEP_TEST_VAR}", "--home=${envvar:LOCAL_SWEEP_TEST_VAR}/x", "${program}"],
])
def test_command_expansion_matches_wandbs_agent(command, monkeypatch):
    monkeypatch.setenv("LOCAL_SWEEP_TEST_VAR", "from-env")
    kwargs = dict(program="train.py", interpreter="python", args_json_file="/tmp/config-x.json")
    ours = macros.expand_command(command, PARAMS, **kwargs)
    assert ours == wandb_expansion(command, PARAMS, "train.py", "python", "/tmp/config-x.json")
    if command is None:
        assert ours[:3] == ["/usr/bin/env", "python", "train.py"] and ours[3] == "--attention=rope_small"


def test_params_file_is_byte_for_byte_what_wandbs_agent_writes(tmp_path):
    from wandb.sdk.lib import config_util

    theirs = tmp_path / "theirs.yaml"
    config_util.save_config_file_from_dict(str(theirs), {k: {"value": v} for k, v in PARAMS.items()})
    assert macros.params_file_text(PARAMS) == theirs.read_text()
    ours = tmp_path / "ours.yaml"
    ours.write_text(macros.params_file_text(PARAMS))
    assert config_util.dict_from_config_file(str(ours)) == PARAMS  # what wandb.init reads back


def test_engine_sees_states_and_the_metric():
    sweep = state.Sweep(Path("/nonexistent"), {"sweep_id": "abc", "runs": [
        {"id": "r1", "params": {"lr": 0.1}, "status": "finished", "metrics": {"val/loss": 3.5, "params/total": 9},
         "metric_history": [{"step": 10, "val/loss": 3.2}]},
        {"id": "r2", "params": {"lr": 0.2}, "status": "diverged", "metrics": {}},
        {"id": "r3", "params": {"lr": 0.3}, "status": "interrupted", "metrics": {}},
    ]})
    r1, r2, r3 = engine.engine_runs(sweep, "val/loss")
    assert (r1.state, r2.state, r3.state) == ("finished", "failed", "preempted")
    assert r1.summary_metrics == {"val/loss": 3.5} and r1.config == {"lr": {"value": 0.1}}
    assert r1.metric_extremum("val/loss", "minimum") == 3.2


# --- bad input: one `error:` line, exit 2, nothing started --------------------------------------

def refuse(capsys, tmp_path, argv) -> str:
    code = cli.main([*map(str, argv), "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists()  # nothing written, nothing run
    return lines[0]


@pytest.mark.parametrize("text,expected", [
    ("method: grid\nparameters: {attention: {values: [baseline, lora_small}}\n", "malformed YAML"),
    ("method: grid\n  parameters: x\n", "malformed YAML"),
    ("- just\n- a list\n", "a sweep YAML is a mapping"),
    ("", "a sweep YAML is a mapping"),
    ("method: grod\nparameters: {attention: {values: [baseline]}}\n", "W&B's sweep schema rejects it"),
    ("method: grid\nparameters: {attention: {valuez: [baseline]}}\n", "W&B's sweep schema rejects it"),
    ("method: grid\n", "W&B's sweep schema rejects it"),
    ("method: grid\nparameters: {attention: {values: [baseline]}}\n", "names no `program:`"),
    ("program: train.py\nmethod: custom\nparameters: {lr: {values: [1]}}\n", "this local agent runs grid"),
    ("program: train.py\nmethod: random\nparameters: {lr: {min: 0.001, max: 0.01}}\n", "give --count N"),
    ("program: train.py\nmethod: grid\nparameters: {lr: {min: 0.001, max: 0.01}}\n", "engine refuses it"),
    ("program: train.py\nmethod: bayes\nparameters: {lr: {min: 0.001, max: 0.01}}\n", "engine refuses it"),
    ("program: nowhere.py\nmethod: grid\nparameters: {attention: {values: [baseline]}}\n", "not found"),
])
def test_malformed_or_schema_invalid_sweeps_are_refused(capsys, tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = refuse(capsys, tmp_path, [path])
    assert expected in line and str(path) in line


def test_unreadable_sweep_files_are_refused(capsys, tmp_path):
    assert "no such sweep file" in refuse(capsys, tmp_path, [tmp_path / "missing.yaml"])
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("method: grid\nname: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in refuse(capsys, tmp_path, [binary])


def test_every_bad_value_is_listed_before_any_run(capsys, tmp_path, fake):
    sweep = write_sweep(tmp_path / "bad.yaml", fake, {
        "attention": {"values": ["baseline", "foo", "rope_small"]},
        "steps": {"values": [0, 5]},
        "lr": {"value": "fast"},
        "no_such_knob": {"value": 1},
    })
    line = refuse(capsys, tmp_path, [sweep])
    assert line.startswith(f"error: {sweep}: bad values: ")
    for fragment in ("attention=foo (unknown attention variant 'foo'", "steps=0 (--steps=0: must be greater than 0)",
                     "lr=fast (--lr=fast: expected a number)", "no_such_knob=1 (unknown option --no_such_knob"):
        assert fragment in line
    assert calls(fake) == []


def test_values_that_fail_only_together_are_named_together(capsys, tmp_path, fake):
    sweep = write_sweep(tmp_path / "bad.yaml", fake, {
        "attention": {"values": ["baseline", "lora_small"]},
        "d_model": {"values": [64, 96]},
        "n_heads": {"values": [4, 6]},
        "q_lora_rank": {"value": 16},
    })
    line = refuse(capsys, tmp_path, [sweep])
    assert "d_model=64, n_heads=6 (--d_model=64 is not divisible by --n_heads=6)" in line
    assert "q_lora_rank=16, attention=baseline (--q_lora_rank=16: only latent (MLA) variants have it" in line
    assert "d_model=96" not in line and "n_heads=4" not in line  # values fine on their own are not blamed


def test_random_and_bayes_values_are_checked_one_by_one(capsys, tmp_path, fake):
    sweep = write_sweep(tmp_path / "bad.yaml", fake, {
        "attention": {"values": ["baseline", "flash_magic"]},
        "lr": {"distribution": "uniform", "min": -0.1, "max": 0.01},
        "d_model": {"value": 64},
        "n_heads": {"values": [4, 5]},
    }, method="random")
    line = refuse(capsys, tmp_path, [sweep, "--count", "3"])
    assert "attention=flash_magic" in line and "lr=-0.1 (--lr=-0.1: must be 0 or greater)" in line
    assert "n_heads=5" in line and "n_heads=4" not in line


def test_bad_options_are_one_error_line(capsys):
    for argv in (["x.yaml", "--count", "0"], ["x.yaml", "--count", "many"], [], ["x.yaml", "--retry-failed"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_resuming_an_unknown_sweep_is_refused(capsys, tmp_path):
    line = refuse(capsys, tmp_path, ["--resume", "zzzzzzzz"])
    assert "--resume zzzzzzzz: no sweep there" in line


def test_the_real_command_line_refuses_without_a_traceback(tmp_path, fake):
    sweep = write_sweep(tmp_path / "bad.yaml", fake, {"attention": {"values": ["baseline", "foo"]}})
    result = run_cli(sweep, "--results-dir", tmp_path / "results")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {sweep}: bad values: attention=foo")
    assert "Traceback" not in result.stderr + result.stdout and "Warning" not in result.stderr
    assert not (tmp_path / "results").exists() and calls(fake) == []


# --- the run loop, with the fake program ----------------------------------------------------------

def test_a_grid_with_a_failing_and_a_crashing_run_finishes_and_resumes(tmp_path, fake):
    sweep = write_sweep(tmp_path / "grid.yaml", fake, {
        "attention": {"values": ["baseline", "lora_small", "rope_small", "bias_only"]},
        "seed": {"value": 0}, "steps": {"value": 5}, "attention_bias": {"value": False}})
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--no-report", FAKE_FAIL="lora_small", FAKE_CRASH="rope_small")
    assert result.returncode == 0, result.stdout + result.stderr  # failed runs are results, not errors
    out = result.stdout
    sweep_dir = only_sweep_dir(results)
    sweep_id = sweep_dir.name
    assert len(sweep_id) == 8 and set(sweep_id) <= set(common.ID_ALPHABET)

    # one progress line per run, with the reason for the failures
    assert "[1/4] baseline-s0  finished  val_loss=3.800" in out
    assert "[2/4] lora_small-s0  failed" in out and "(injected failure for lora_small)" in out
    assert "[3/4] rope_small-s0  failed" in out and "RuntimeError: crashed before writing a record" in out
    assert "[4/4] bias_only-s0  finished  val_loss=3.900" in out

    # the table: sorted by val loss, failures last
    table = out[out.index("run "):]
    order = [line.split()[0] for line in table.splitlines()[2:6]]
    assert order[:2] == ["baseline-s0", "bias_only-s0"] and set(order[2:]) == {"lora_small-s0", "rope_small-s0"}
    baseline_row = next(line for line in table.splitlines() if line.startswith("baseline-s0"))
    assert baseline_row.split()[1:] == ["finished", "3.8000", "0.2500", "2.500", "1.5", "0.125"]

    # the state
    state = state_of(sweep_dir)
    assert state["complete"] is True and state["sweep_id"] == sweep_id
    statuses = {r["name"]: r["status"] for r in state["runs"]}
    assert statuses == {"baseline-s0": "finished", "lora_small-s0": "failed", "rope_small-s0": "failed",
                        "bias_only-s0": "finished"}
    assert (sweep_dir / "sweep.yaml").read_text() == sweep.read_text()

    # the agent's contract, as the program saw it
    made = calls(fake)
    assert [c["argv"][0] for c in made] == ["--attention=baseline", "--attention=lora_small",
                                            "--attention=rope_small", "--attention=bias_only"]
    first = made[0]
    assert sorted(first["argv"][:-2]) == ["--attention=baseline", "--attention_bias=False", "--seed=0", "--steps=5"]
    assert first["argv"][-2:] == [f"--results_dir={results.resolve()}", f"--group={sweep_id}"]
    run_env = first["env"]
    assert run_env["WANDB_MODE"] == "offline"
    # no sweep id (the server has never seen it: wandb#8115); the sweep is the group and a tag
    assert "WANDB_SWEEP_ID" not in run_env
    assert run_env["WANDB_RUN_GROUP"] == sweep_id and f"local-sweep-{sweep_id}" in run_env["WANDB_TAGS"].split(",")
    assert run_env["WANDB_PROJECT"] == "attnsweep" and run_env["WANDB_DIR"] == str(sweep_dir)
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one at a time: the threads the sweep was given
        assert run_env.get(threads) == os.environ.get(threads)
    run_id = run_env["WANDB_RUN_ID"]
    assert run_id == state["runs"][0]["id"] and len(run_id) == 8
    param_path = Path(run_env["WANDB_SWEEP_PARAM_PATH"])
    assert param_path == sweep_dir / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    assert yaml.safe_load(param_path.read_text())["attention"] == {"value": "baseline"}
    assert len({c["env"]["WANDB_RUN_ID"] for c in made}) == 4

    # records where train.py writes them, logs per run
    assert json.loads((sweep_dir / "baseline-s0.json").read_text())["run_id"] == run_id
    logs = sorted(p.name for p in (sweep_dir / "logs").iterdir())
    assert logs == sorted(f"{r['name']}-{r['id']}.log" for r in state["runs"])
    assert "fake training lora_small-s0" in (sweep_dir / "logs" / f"lora_small-s0-{state['runs'][1]['id']}.log").read_text()

    # --resume: nothing to do, finished runs are not run again
    again = run_cli(sweep, "--resume", sweep_id, "--results-dir", results, "--no-report")
    assert again.returncode == 0, again.stderr
    assert len(calls(fake)) == 4

    # --resume --retry-failed (by the sweep dir's path, no YAML): the failed runs run again, afresh
    retried = run_cli("--resume", sweep_dir, "--retry-failed", "--no-report")
    assert retried.returncode == 0, retried.stderr
    made = calls(fake)
    assert [c["argv"][0] for c in made[4:]] == ["--attention=lora_small", "--attention=rope_small"]
    state = state_of(sweep_dir)
    assert all(r["status"] == "finished" for r in state["runs"])
    assert state["runs"][1]["previous_ids"] == [made[1]["env"]["WANDB_RUN_ID"]]
    assert made[4]["env"]["WANDB_RUN_ID"] == state["runs"][1]["id"] != made[1]["env"]["WANDB_RUN_ID"]


def test_ctrl_c_stops_the_run_cleanly_and_resume_continues_it(tmp_path, fake):
    sweep = write_sweep(tmp_path / "grid.yaml", fake, {
        "attention": {"values": ["baseline", "lora_small", "rope_small"]}, "steps": {"value": 5}})
    results = tmp_path / "results"
    (fake.parent / "sleep_once").touch()
    with processes.started([sys.executable, str(ROOT / "local_sweep.py"), str(sweep), "--results-dir",
                            str(results), "--no-report"], cwd=ROOT, env=env(FAKE_SLEEP="lora_small"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.time() + 60
        while not (fake.parent / "sleeping").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (fake.parent / "sleeping").exists(), "the second run never started"
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err
    sweep_dir = only_sweep_dir(results)
    assert f"continue with: python local_sweep.py {sweep} --resume {sweep_dir.name}" in out
    state = state_of(sweep_dir)
    assert [(r["name"], r["status"]) for r in state["runs"]] == [("baseline-s0", "finished"),
                                                                  ("lora_small-s0", "interrupted")]
    interrupted_id = state["runs"][1]["id"]
    assert json.loads((sweep_dir / "lora_small-s0.json").read_text())["status"] == "interrupted"

    resumed = run_cli(sweep, "--resume", sweep_dir.name, "--results-dir", results, "--no-report")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    made = calls(fake)
    assert [c["argv"][0] for c in made] == ["--attention=baseline", "--attention=lora_small",
                                            "--attention=lora_small", "--attention=rope_small"]
    assert made[2]["env"]["WANDB_RUN_ID"] == interrupted_id  # the same run: train.py resumes its checkpoint
    assert [r["status"] for r in state_of(sweep_dir)["runs"]] == ["finished"] * 3


def test_random_search_runs_count_runs(tmp_path, fake):
    sweep = write_sweep(tmp_path / "random.yaml", fake, {
        "attention": {"values": ["baseline", "rope_small"]},
        "lr": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01}}, method="random")
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--count", 3, "--no-report")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(calls(fake)) == 3 and "[3/3]" in result.stdout
    assert result.stdout.count(" lr=") == 6  # the swept value on each progress line and table row
    assert "values" in result.stdout.split("\n\n")[1].splitlines()[0].split()
    lrs = [float(c["argv"][1].split("=")[1]) for c in calls(fake)]
    assert all(0.0001 <= lr <= 0.01 for lr in lrs)
    assert state_of(only_sweep_dir(results))["count"] == 3


def test_run_cap_caps_the_runs_and_stands_for_count(capsys, tmp_path, fake, monkeypatch):
    """W&B's `run_cap`: at most that many runs in the sweep (the smaller of it and --count), and a
    random search with one needs no --count. A 3-point grid capped at 2 runs its first 2."""
    path = write_sweep(tmp_path / "cap.yaml", fake, {"attention": {"values": ["baseline", "lora_small", "rope_small"]},
                                                     "seed": {"value": 0}}, run_cap=2)
    grid = yaml.safe_load(path.read_text())
    assert [cli.check(grid, "cap.yaml", count)[1:] for count in (None, 5, 1)] == [(2, 2), (2, 2), (1, 1)]
    random = {**grid, "method": "random", "parameters": {"lr": {"min": 0.0001, "max": 0.01}}}
    assert cli.check(random, "random.yaml", None) == ("random", 2, 2)
    monkeypatch.setattr(cli, "install_stop_handlers", lambda: None)  # in process: pytest's own signals stay
    assert cli.main([str(path), "--results-dir", str(tmp_path / "results"), "--no-report"]) == 0
    assert [c["argv"][0] for c in calls(fake)] == ["--attention=baseline", "--attention=lora_small"]
    assert "[2/2] lora_small-s0  finished" in capsys.readouterr().out


def test_a_second_agent_on_the_same_sweep_is_refused(capsys, tmp_path, fake):
    import fcntl

    sweep_dir = tmp_path / "results" / "abcd1234"
    sweep_dir.mkdir(parents=True)
    write_sweep(sweep_dir / "sweep.yaml", fake, {"attention": {"values": ["baseline"]}})
    state.Sweep(sweep_dir, {"state_schema": 1, "sweep_id": "abcd1234", "sweep_file": "x.yaml",
                                  "results_dir": str(tmp_path / "results"), "runs": []}).save()
    with open(sweep_dir / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = cli.main(["--resume", str(sweep_dir), "--no-report"])
    assert code == 2
    assert "is being run by another local_sweep.py" in capsys.readouterr().err
    assert calls(fake) == []


def test_a_failing_report_is_a_warning(tmp_path, capsys, monkeypatch):
    class Broken:
        @staticmethod
        def write_report(source, out_dir):
            raise ValueError("no runs")

    import analysis

    monkeypatch.setitem(sys.modules, "analysis.report", Broken)
    monkeypatch.setattr(analysis, "report", Broken, raising=False)
    table.write_report(tmp_path, tmp_path / "report")
    assert capsys.readouterr().err.startswith("warning: the report failed (ValueError: no runs)")


# --- early_terminate and metric.target -----------------------------------------------------------

# A stand-in for train.py that logs through a real offline W&B run, as train.py does: val/loss at
# steps 1, 2, 3, ... from a fixed curve per variant, baseline's 20 0.05 s apart (past hyperband's
# bands 2, 6 and 18 within a second), rope_only's 100 0.2 s apart; SIGTERM ends it after the step.
# Each run notes in ends.jsonl when it began logging and when it ended; with FAKE_WAIT_FOR=variant a
# run, its steps logged, keeps its W&B run open until that variant has ended (at most 30 s).
FAKE_WANDB = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    import wandb

    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    attention = args["attention"]
    curve = {"baseline": [10, 5, 4, 3] + [3] * 16, "rope_only": [10, 9] + [9] * 98}[attention]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # the command line says lr=-1, then tries to change it: the sweep's value must win (locked)
    run = wandb.init(config={"lr": -1.0, "attention": attention})
    run.config.update({"lr": -2.0}, allow_val_change=True)
    history, ends, began = [], Path(__file__).parent / "ends.jsonl", time.time()
    for step, loss in enumerate(curve, 1):
        if stop:
            break
        run.log({"val/loss": loss}, step=step)
        history.append({"step": step, "val/loss": loss})
        time.sleep(0.05 if attention == "baseline" else 0.2)
    wait_for, deadline = os.environ.get("FAKE_WAIT_FOR"), time.time() + 30
    while wait_for and not stop and time.time() < deadline and not (ends.exists() and any(
            json.loads(line)["attention"] == wait_for for line in ends.read_text().splitlines())):
        time.sleep(0.05)
    with open(ends, "a") as f:
        f.write(json.dumps({"attention": attention, "start": began, "end": time.time()}) + "\\n")
    status = "interrupted" if stop else "finished"
    out = Path(args["results_dir"]) / args["group"] / f"{attention}-s0.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run_id": os.environ["WANDB_RUN_ID"], "status": status,
                               "error": "stopped by a signal" if stop else None,
                               "summary": {"val/loss": history[-1]["val/loss"]}, "history": history}))
    run.finish(exit_code=130 if stop else 0)
    sys.exit(130 if stop else 0)
''')


def run_hyperband_sweep(tmp_path: Path, *options, **extra_env) -> tuple[subprocess.CompletedProcess, Path]:
    """FAKE_WANDB's baseline and rope_only under hyperband (min_iter 2, eta 3): (the run, its sweep dir)."""
    program = tmp_path / "fake" / "fake_wandb.py"
    program.parent.mkdir()
    program.write_text(FAKE_WANDB)
    sweep = write_sweep(tmp_path / "hb.yaml", program, {
        "attention": {"values": ["baseline", "rope_only"]}, "lr": {"value": 0.001}},
        early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3})
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--no-report", *options, timeout=180, **extra_env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, only_sweep_dir(results)


def test_hyperband_stops_the_run_that_falls_behind_as_stopped(tmp_path):
    """W&B's hyperband with min_iter=2, eta=3 (bands at 2, 6, 18 steps; r=1/3): at band 2 the
    threshold over {baseline: 5, rope_only: 9} is sorted([5, 9])[int(2/3)] = 5, and rope_only's best
    so far, 9, is above it: it is stopped there, read from its W&B history while it runs. Without
    early termination it would log 100 steps (20 s)."""
    result, sweep_dir = run_hyperband_sweep(tmp_path)
    first, second = state_of(sweep_dir)["runs"]
    assert (first["name"], first["status"]) == ("baseline-s0", "finished")  # alone at its bands: never stopped
    assert (second["name"], second["status"]) == ("rope_only-s0", "stopped")
    assert "hyperband" in second["error"] and "Band: 2" in second["error"]
    assert 2 <= len(second["metric_history"]) < 20  # stopped early, a few polls after step 2
    assert "rope_only-s0  stopped" in result.stdout

    # W&B saw the stop as the agent's doing, not a crash: the run's state for the engine is killed
    runs = engine.engine_runs(state.Sweep(sweep_dir, state_of(sweep_dir)), "val/loss")
    assert [r.state for r in runs] == ["finished", "killed"]

    # the offline runs: no sweep id, the sweep as group and tag, the config locked to the params file
    for entry in (first, second):
        (run_dir,) = (sweep_dir / "wandb").glob(f"offline-run-*-{entry['id']}")
        logged = offline_run_contents(run_dir)
        assert logged["sweep_id"] == "" and logged["group"] == sweep_dir.name
        assert f"local-sweep-{sweep_dir.name}" in logged["tags"]
        assert logged["config"]["lr"] == 0.001 and logged["config"]["attention"] == entry["params"]["attention"]

    # a stopped run is a result: --resume does not run it again
    runs_before = sorted(p.name for p in (sweep_dir / "wandb").glob("offline-run-*"))
    again = run_cli("--resume", sweep_dir, "--no-report")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [r["status"] for r in state_of(sweep_dir)["runs"]] == ["finished", "stopped"]
    assert sorted(p.name for p in (sweep_dir / "wandb").glob("offline-run-*")) == runs_before  # nothing re-ran


def test_early_terminate_without_wandb_history_is_refused(capsys, tmp_path, fake, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = write_sweep(tmp_path / "hb.yaml", fake, {"attention": {"values": ["baseline"]}},
                        early_terminate={"type": "hyperband", "min_iter": 2})
    assert "WANDB_MODE=disabled" in refuse(capsys, tmp_path, [sweep])


def test_bad_early_terminate_settings_are_refused(capsys, tmp_path, fake):
    sweep = write_sweep(tmp_path / "hb.yaml", fake, {"attention": {"values": ["baseline"]}},
                        early_terminate={"type": "hyperband", "max_iter": 1, "s": 2, "eta": 3})
    assert "early_terminate" in refuse(capsys, tmp_path, [sweep])


def test_reaching_the_metric_target_ends_the_hand_out_of_runs(tmp_path, fake):
    """The fake's val/loss is 3.0 + len(attention)/10: rope_only 3.9, baseline 3.8, bias_only 3.9.
    With target 3.85 (minimize), baseline reaches it: bias_only, next in the grid, never starts."""
    sweep = write_sweep(tmp_path / "target.yaml", fake, {
        "attention": {"values": ["rope_only", "baseline", "bias_only"]}, "seed": {"value": 0}})
    config = yaml.safe_load(sweep.read_text())
    config["metric"]["target"] = 3.85
    sweep.write_text(yaml.safe_dump(config, sort_keys=False))
    results = tmp_path / "results"
    result = run_cli(sweep, "--results-dir", results, "--no-report")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c["argv"][0] for c in calls(fake)] == ["--attention=rope_only", "--attention=baseline"]
    assert "baseline-s0" in result.stdout and "reached the metric target val/loss=3.85" in result.stdout
    sweep_dir = only_sweep_dir(results)
    saved = state_of(sweep_dir)
    assert saved["complete"] is True and saved["target_reached_by"] == saved["runs"][1]["id"]
    # and a resumed sweep stays finished
    assert run_cli("--resume", sweep_dir, "--no-report").returncode == 0
    assert len(calls(fake)) == 2


def test_a_ctrl_c_the_kernel_hands_to_another_thread_still_stops_the_run():
    """In a sweep that preloaded torch and wandb, the process has threads besides the main one and
    the kernel may deliver Ctrl-C to any of them. The main thread waits for the runs in flight; it
    must still see the signal and pass it on (a blocking waitpid never woke up: the run trained on)."""
    import threading

    from localsweep import runner

    # Ctrl-C as a terminal gives it, here and in the sleeper, however the suite was started
    with (processes.terminal_signals(),
          processes.started([sys.executable, "-c", "import time; time.sleep(60)"]) as run):
        flight = runner.Flight()
        launch = runner.Launch({"name": "sleeper", "id": "sleeper"}, "sleeper", log_file=None, stop_file=None)
        launch.proc = run
        flight.runs.append(launch)
        other = threading.Thread(
            target=lambda: (time.sleep(0.5), signal.pthread_kill(threading.get_ident(), signal.SIGINT)))
        started = time.monotonic()
        other.start()
        try:
            ended = flight.wait()
        finally:
            other.join()
    assert time.monotonic() - started < 20  # not the sleeper's 60 s
    assert ended == [launch] and flight.stopped_by == signal.SIGINT and not launch.early
    assert launch.rc == -signal.SIGINT and launch.stopped_by == signal.SIGINT  # the run got the Ctrl-C passed on


def test_several_sweeps_run_in_turn_each_its_own_and_a_bad_one_stops_all_before_any_run(capsys, tmp_path, fake):
    """`local_sweep.py A.yaml B.yaml --parallel 2` (the main job's form): A's runs, then B's, each
    in its own sweep directory with its own state; a bad B is refused before A starts; options that
    belong to one sweep are refused with several."""
    first = write_sweep(tmp_path / "a.yaml", fake, {"attention": {"values": ["baseline", "lora_small"]},
                                                  "seed": {"value": 0}, "steps": {"value": 5}})
    second = write_sweep(tmp_path / "b.yaml", fake, {"attention": {"value": "rope_small"},
                                                   "seed": {"values": [0, 1]}, "steps": {"value": 5}})
    bad = write_sweep(tmp_path / "bad.yaml", fake, {"attention": {"value": "foo"}})
    line = refuse(capsys, tmp_path, [first, bad])
    assert line.startswith(f"error: {bad}: bad values: ") and calls(fake) == []
    for option in (["--count", "1"], ["--then-stage2"], ["--report-dir", str(tmp_path / "r")], ["--resume", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(first), str(second), *option])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1
        assert err[0].startswith(f"error: {option[0]} goes with one sweep YAML, not 2"), err
    results = tmp_path / "results"
    result = run_cli(first, second, "--results-dir", results, "--parallel", 2)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [dict(a[2:].split("=", 1) for a in c["argv"] if a.startswith("--")) for c in calls(fake)]
    ran = [(r["attention"], r["seed"]) for r in ran]  # two at once: either of a sweep's two may start first
    assert sorted(ran[:2]) == [("baseline", "0"), ("lora_small", "0")]
    assert sorted(ran[2:]) == [("rope_small", "0"), ("rope_small", "1")]
    assert result.stdout.count(" runs, 2 at once, ") == 2  # each sweep of the two ran two at once
    states = sorted((state_of(p) for p in results.iterdir() if (p / "sweep_state.json").exists()),
                    key=lambda state: state["sweep_file"])
    assert [(s["sweep_file"], s["complete"], len(s["runs"])) for s in states] == [(str(first), True, 2), (str(second), True, 2)]
    assert result.stdout.index(f"{states[0]['sweep_id']}: {first}") < result.stdout.index(f"{states[1]['sweep_id']}: {second}")
    # the two reports' paths come last, together, each in its own sweep's directory
    tail = result.stdout.rstrip().split("reports:\n")[-1].splitlines()
    reports = [results / s["sweep_id"] / "report" / "report.md" for s in states]
    assert sorted(line.strip() for line in tail) == sorted(str(path) for path in reports)
    assert all(path.is_file() for path in reports)
