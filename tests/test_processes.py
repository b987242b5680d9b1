"""Tests of the tests (issue 22): the suite passes however it is launched, and no test leaves a
process behind. processes.py starts every process a test starts; conftest.py gives the session
its own HOME, compile cache and interpreter name."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import processes
from train_helpers import ROOT

# A non-interactive shell's background job, as CI runners, nohup and job schedulers start commands:
# bash gives it SIGINT and SIGQUIT ignored (no job control), and Python then installs no
# KeyboardInterrupt handler.
IN_THE_BACKGROUND = ["bash", "-c", '"$@" & wait $!', "bash"]

# Prints the SIGINT/SIGQUIT/SIGTERM/SIGHUP bits of its ignored and blocked masks (/proc/self/status).
REPORT_SIGNALS = """
import signal
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
for mask in ("SigIgn", "SigBlk"):
    bits = int(status[mask], 16)
    print(mask, sorted(s.name for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
                       if bits >> (s - 1) & 1))
"""

# Started with SIGINT ignored: through processes.run, a child that reports its signals.
THROUGH_THE_HELPER = f"""
import signal, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import processes
print("here", signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
print(processes.run([sys.executable, "-c", {REPORT_SIGNALS!r}], capture_output=True, text=True, timeout=60).stdout)
"""


def test_a_background_job_of_a_non_interactive_shell_ignores_sigint():
    """The control for the tests below: started this way, a process really has SIGINT ignored."""
    done = processes.run([*IN_THE_BACKGROUND, sys.executable, "-c", REPORT_SIGNALS], capture_output=True,
                         text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "SigIgn ['SIGINT', 'SIGQUIT']" in done.stdout


def test_a_started_process_gets_the_terminals_signals_whatever_its_starter_had():
    done = processes.run([*IN_THE_BACKGROUND, sys.executable, "-c", THROUGH_THE_HELPER], capture_output=True,
                         text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == ["here True", "SigIgn []", "SigBlk []"]


# Starts a child in its own process group and one in its own session (escaping the starter's
# session, as a daemon would), writes their pids, then sleeps.
SPAWNER = """
import os, subprocess, sys, time
group = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], process_group=0)
session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1] + ".tmp", "w").write(f"{group.pid} {session.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def spawned(pids_file: Path, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while not pids_file.exists():
        assert time.monotonic() < deadline, "the spawner never wrote its children's pids"
        time.sleep(0.05)
    return [int(pid) for pid in pids_file.read_text().split()]


def test_leaving_started_kills_what_the_process_started_even_outside_its_group(tmp_path):
    pids_file = tmp_path / "pids"
    with processes.started([sys.executable, "-c", SPAWNER, str(pids_file)]) as proc:
        children = spawned(pids_file)
        assert all(alive(pid) for pid in [proc.pid, *children])
        listed = {int(line.split()[0]) for line in processes.still_running(proc.mark)}
        assert listed == {proc.pid, *children}
    assert not any(alive(pid) for pid in [proc.pid, *children])
    assert processes.still_running(proc.mark) == []


def test_a_timed_out_run_kills_the_whole_tree_before_raising(tmp_path):
    pids_file = tmp_path / "pids"
    started = time.monotonic()
    try:
        processes.run([sys.executable, "-c", SPAWNER, str(pids_file)], timeout=4)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise AssertionError("a 120 s process ended within a 4 s timeout")
    assert time.monotonic() - started < 60
    children = spawned(pids_file, timeout=0)
    assert len(children) == 2 and not any(alive(pid) for pid in children)


def test_the_session_has_its_own_home_and_caches_and_its_children_share_them():
    """HOME, the W&B and HF dirs and the inductor cache are this session's own, not the caller's
    (two suites on one machine share none of them), and a started process sees the same, with
    PYTHON naming this interpreter whatever PATH finds."""
    import wandb.env
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    private = Path(conftest._session_dir)
    assert private.name.startswith("attnsweep-tests-") and Path.home() == private / "home"
    assert Path(cache_dir()) == private / "inductor"
    for path in (wandb.env.get_cache_dir(), wandb.env.get_data_dir(), os.environ["HF_HOME"],
                 os.environ["MPLCONFIGDIR"]):
        assert Path(path).is_relative_to(private / "home"), path
    caller = conftest._saved_environ
    assert cache_dir() != caller.get("TORCHINDUCTOR_CACHE_DIR") and str(Path.home()) != caller.get("HOME")
    assert "WANDB_API_KEY" not in os.environ and os.environ["WANDB_MODE"] == "offline"

    show = "import os, sys; print(os.environ['PYTHON'] == sys.executable, os.path.expanduser('~'), " \
           "os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    done = processes.run([sys.executable, "-c", show], env={**os.environ, "PYTHON": "elsewhere"},
                         capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", str(Path.home()), cache_dir()], done.stderr


def test_the_gpu_script_runs_the_interpreter_it_is_given_not_the_one_on_path(tmp_path):
    """bench/gpu.sh runs "${PYTHON:-python3}": with a python3 on PATH that is not this one (as
    without an activated venv), it still runs this one; without PYTHON it would run PATH's."""
    stub = tmp_path / "bin"
    stub.mkdir()
    for name in ("python", "python3"):
        (stub / name).write_text("#!/bin/sh\necho 'not the tests interpreter' >&2\nexit 97\n")
        (stub / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}
    given = processes.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert given.returncode == 0 and "usage: python -m bench.gpu" in given.stdout, given.stderr
    unset = processes.run(["bash", "-c", 'unset PYTHON; exec bash "$0" --help', str(ROOT / "bench" / "gpu.sh")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 97 and "not the tests interpreter" in unset.stderr  # the control


# The cheapest Ctrl-C tests: local_sweep with a fake run, and the signal handed to another thread.
CTRL_C_TESTS = ["tests/test_local_sweep.py::test_ctrl_c_stops_the_run_cleanly_and_resume_continues_it",
                "tests/test_local_sweep.py::test_a_ctrl_c_the_kernel_hands_to_another_thread_still_stops_the_run"]
BUDGET_S = 240  # ~15 s on 2 idle cores; the first of them, its Ctrl-C lost, hung past 90 s


def test_the_ctrl_c_tests_pass_in_a_suite_started_with_sigint_ignored_and_leave_nothing_running():
    with processes.started([*IN_THE_BACKGROUND, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *CTRL_C_TESTS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) as suite:
        try:
            out, _ = suite.communicate(timeout=BUDGET_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"not done in {BUDGET_S} s; running: {processes.still_running(suite.mark)}") from None
        left = processes.still_running(suite.mark)  # before leaving `started` kills them
    assert suite.returncode == 0 and left == [], (left, out[-5000:])
    assert f"{len(CTRL_C_TESTS)} passed" in out
