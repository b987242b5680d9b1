"""Tests of the tests (issue 22): the suite passes however it is launched, and no test leaves a
process behind. processes.py starts every process a test starts; conftest.py gives the session
its own HOME, compile cache and interpreter name."""
import ast
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

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


# nohup starts its command with SIGHUP ignored (and SIGINT as it found it)
NOHUP = ["nohup"]


@pytest.mark.parametrize("launcher, starter_ignores", [(IN_THE_BACKGROUND, "SIGINT"), (NOHUP, "SIGHUP")],
                         ids=["background-job", "nohup"])
def test_a_started_process_gets_the_terminals_signals_whatever_its_starter_had(launcher, starter_ignores):
    script = THROUGH_THE_HELPER.replace("signal.SIGINT) == signal.SIG_IGN", f"signal.{starter_ignores}) == signal.SIG_IGN")
    done = processes.run([*launcher, sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
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
    PYTHON naming this interpreter whatever PATH finds; torch runs one thread here and in what a
    test starts, whatever the caller's environment (torch's default is one a core)."""
    import torch
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
    assert torch.get_num_threads() == 1
    # inductor's precompiled headers, which it keeps outside its cache dir, and temp files
    from torch._inductor import codecache
    assert Path(codecache._HEADER_DIR).is_relative_to(private / "tmp") and Path(tempfile.gettempdir()) == private / "tmp"

    show = "import os, sys, tempfile; print(os.environ['PYTHON'] == sys.executable, os.path.expanduser('~'), " \
           "os.environ['TORCHINDUCTOR_CACHE_DIR'], os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], " \
           "tempfile.gettempdir())"
    done = processes.run([sys.executable, "-c", show], env={**os.environ, "PYTHON": "elsewhere"},
                         capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", str(Path.home()), cache_dir(), "1", "1", str(private / "tmp")], done.stderr


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


# How a test could start a process without tests/processes.py, and the one place that may: the
# forked record writers of test_claims.py (in-process forks that write one file and exit; joined
# with a timeout and killed in a finally).
STARTERS = {("subprocess", name) for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput")} | {
    ("os", name) for name in ("fork", "forkpty", "system", "popen", "spawnv", "spawnl", "execv", "posix_spawn")} | {
    ("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell")}
MAY_START_ITS_OWN = {"processes.py": "the home", "test_claims.py": "two forked record writers, killed in a finally"}


def process_starts(source: str) -> list[int]:
    """The lines of Python source that start a process other than through processes.py: a call of
    one of STARTERS, or an import of multiprocessing. (A script in a string, run by a child, is the
    child's own and is not code here.)"""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in STARTERS:
            lines.append(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(name and name.split(".")[0] == "multiprocessing" for name in names):
                lines.append(node.lineno)
    return sorted(lines)


def test_no_test_starts_a_process_but_through_tests_processes():
    """README: every process a test starts gets its own session, the terminal's Ctrl-C and the tests'
    interpreter, and is killed with all it started -- which holds for what processes.py starts."""
    offenders = {path.name: process_starts(path.read_text()) for path in sorted((ROOT / "tests").glob("*.py"))
                 if path.name not in MAY_START_ITS_OWN}
    assert {name: lines for name, lines in offenders.items() if lines} == {}
    planted = "import sys, subprocess\ndef test_x():\n    subprocess.Popen([sys.executable, 'train.py']).wait()\n"
    assert process_starts(planted) == [3]
    assert process_starts("import multiprocessing.pool\n") == [1]
    assert process_starts("SCRIPT = 'import subprocess; subprocess.run([\"ls\"])'\n") == []
