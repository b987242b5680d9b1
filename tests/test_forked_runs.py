"""local_sweep.py forks each train.py run after importing torch and wandb once (localsweep/forked.py,
issue 13 section 4): the same record as a fresh process gives, each run its own process with its
own status, a crash or kill in one run leaving the others to finish, Ctrl-C as on the plain path."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

import processes
from train_helpers import NO_WANDB, ROOT, TINY, offline_env, small_corpus


def tiny_sweep(tmp: Path, attention: list[str], **overrides) -> Path:
    values = {**TINY, "dataset": str(small_corpus(tmp)), "cache_dir": str(tmp / "cache"), **overrides}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "program": "train.py", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"attention": {"values": attention}, **{k: {"value": v} for k, v in values.items()}}}))
    return path


def sweep_dir_of(results: Path) -> Path:
    (sweep_dir,) = [p for p in results.iterdir() if (p / "sweep_state.json").exists()]
    return sweep_dir


def state_of(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep_state.json").read_text())


def local_sweep(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    return processes.run([sys.executable, "local_sweep.py", *map(str, args)], cwd=ROOT, env=offline_env(**env),
                         capture_output=True, text=True, timeout=timeout)


def test_a_forked_run_gives_the_same_record_as_a_fresh_process(tmp_path):
    sweep = tiny_sweep(tmp_path, ["rope_small"])
    records = {}
    # the fresh process is the reference: its W&B side is not read (NO_WANDB), the forked run's is
    for how, extra, env in (("fork", [], {}), ("subprocess", ["--subprocess"], NO_WANDB)):
        done = local_sweep(sweep, "--results-dir", tmp_path / how, "--no-report", *extra, **env)
        assert done.returncode == 0, done.stdout + done.stderr
        sweep_dir = sweep_dir_of(tmp_path / how)
        (entry,) = state_of(sweep_dir)["runs"]
        assert (entry["status"], entry["started_as"]) == ("finished", how)
        records[how] = json.loads((sweep_dir / "rope_small-s0.json").read_text())
    fork, fresh = records["fork"], records["subprocess"]
    assert fork["history"] and len(fork["history"]) == len(fresh["history"])
    for a, b in zip(fork["history"], fresh["history"]):  # every logged loss, bit for bit
        assert {k: v for k, v in a.items() if "loss" in k} == {k: v for k, v in b.items() if "loss" in k}
    for key in ("val/loss", "data/fingerprint", "init/shared_fingerprint", "params/total"):
        assert fork["summary"][key] == fresh["summary"][key], key
    assert fork["run_id"] != fresh["run_id"]
    # its own W&B run, ended with its own exit code
    (run_dir,) = (sweep_dir_of(tmp_path / "fork") / "wandb").glob(f"offline-run-*-{fork['run_id']}")
    assert list(run_dir.glob("run-*.wandb"))


# Runs local_sweep's command line in a process where train.main is wrapped: it notes each run's pid,
# then crashes (an exception train.py does not catch), kills itself, or trains, by variant.
WRAPPER = textwrap.dedent('''
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import train
    real_main = train.main

    def main(args):
        attention = dict(a[2:].split("=", 1) for a in args if "=" in a)["attention"]
        held = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{{fd}}")]
        (Path({markers!r}) / attention).write_text(json.dumps([os.getpid(), [p for p in held if p.endswith(".lock")]]))
        if attention == "rope_small":
            raise RuntimeError("injected crash")
        if attention == "bias_only":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_main(args)

    train.main = main
    from localsweep.cli import main as cli
    print("sweep pid", os.getpid(), flush=True)
    sys.exit(cli(sys.argv[1:]))
''')


def wrapper(tmp: Path) -> tuple[Path, Path]:
    markers = tmp / "markers"
    markers.mkdir()
    path = tmp / "wrapped_local_sweep.py"
    path.write_text(WRAPPER.format(root=str(ROOT), markers=str(markers)))
    return path, markers


def test_a_crash_or_kill_in_one_forked_run_leaves_the_others_finishing(tmp_path):
    program, markers = wrapper(tmp_path)
    sweep = tiny_sweep(tmp_path, ["rope_small", "bias_only", "baseline"])
    done = processes.run([sys.executable, str(program), str(sweep), "--results-dir", str(tmp_path / "r"),
                          "--no-report"], cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr  # a failed run is a result, not an error
    runs = {e["name"]: e for e in state_of(sweep_dir_of(tmp_path / "r"))["runs"]}
    assert {name: (e["status"], e["started_as"]) for name, e in runs.items()} == {
        "rope_small-s0": ("failed", "fork"), "bias_only-s0": ("failed", "fork"), "baseline-s0": ("finished", "fork")}
    assert "RuntimeError: injected crash" in runs["rope_small-s0"]["error"]
    assert runs["bias_only-s0"]["error"].startswith("killed by SIGKILL")
    assert runs["baseline-s0"]["metrics"]["val/loss"] > 0
    # each run was its own process, none of them the sweep's
    sweep_pid = int(done.stdout.split("sweep pid ")[1].split()[0])
    seen = [json.loads((markers / v).read_text()) for v in ("rope_small", "bias_only", "baseline")]
    pids = {pid for pid, _ in seen}
    assert len(pids) == 3 and sweep_pid not in pids
    assert all(locks == [] for _, locks in seen)  # no run holds the sweep's lock (a fresh process would not)


def test_ctrl_c_stops_a_forked_run_cleanly(tmp_path):
    """As the plain path's test: the run checkpoints and ends interrupted, the sweep exits 130.
    The run's budget ends it by itself (~30 s on 2 idle cores) if the Ctrl-C is lost; it comes
    well under a second after the progress bar appears."""
    program, markers = wrapper(tmp_path)
    sweep = tiny_sweep(tmp_path, ["baseline"], steps=2000, eval_every=2000)
    with processes.started([sys.executable, str(program), str(sweep), "--results-dir", str(tmp_path / "r"),
                            "--no-report"], cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) as process:
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "r").glob("*/logs/baseline-s0-*.log")):
            time.sleep(0.2)
        log = next((tmp_path / "r").glob("*/logs/baseline-s0-*.log"))
        while time.time() < deadline and "baseline-s0:" not in log.read_text(errors="replace"):
            time.sleep(0.2)  # training has begun: tqdm's bar names the run
        assert (markers / "baseline").exists()
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err
    sweep_dir = sweep_dir_of(tmp_path / "r")
    (entry,) = state_of(sweep_dir)["runs"]
    assert (entry["status"], entry["started_as"], entry["exit_code"]) == ("interrupted", "fork", 130)
    assert json.loads((sweep_dir / "baseline-s0.json").read_text())["status"] == "interrupted"
    assert list((sweep_dir / "checkpoints").iterdir())  # it saved a checkpoint to resume from


def test_only_train_py_under_the_default_command_is_forked():
    from localsweep.forked import can_fork

    default = ["${env}", "${interpreter}", "${program}", "${args}"]
    assert can_fork(None, str(ROOT / "train.py")) and can_fork(default, "train.py")
    assert not can_fork(default, "fake_train.py")  # another program: a subprocess, as wandb agent
    assert not can_fork(["${env}", "accelerate", "launch", "--num_processes=2", "${program}", "${args}"], "train.py")
    assert not can_fork([*default, "--steps=5"], "train.py")  # any change to the command line
