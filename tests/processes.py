"""Every process a test starts goes through here, so that no launcher and no failed test can wreck
the rest of the suite (issue 22):

- it starts in its own session (so its own process group: `os.killpg(proc.pid, sig)` is Ctrl-C
  to it and to all it starts) with SIGINT, SIGQUIT, SIGTERM and SIGHUP at their defaults and none
  blocked, as a terminal gives them. A suite started as `cmd &` from a non-interactive shell (CI
  runners, nohup, job schedulers) runs with SIGINT ignored, and a child would inherit that: Python
  then installs no KeyboardInterrupt handler and a Ctrl-C test tested the launcher, not our code;
- its environment names the interpreter the tests run (PYTHON=sys.executable: bench/gpu.sh and
  the like run "${PYTHON:-python3}", so the suite passes without an activated venv) and carries a
  mark, a token unique to this start, that everything it starts inherits;
- when the test is done with it -- passed, failed or timed out -- everything carrying its mark or
  in its session is killed (SIGKILL) and the process is reaped: a run that setpgid()s itself
  (local_sweep's runs do) or outlives its parent is found all the same.

    from processes import run, started

    done = run([sys.executable, "train.py", ...], capture_output=True, text=True, timeout=300)
    with started([sys.executable, "local_sweep.py", ...], stdout=PIPE, stderr=PIPE, text=True) as proc:
        ...  # os.killpg(proc.pid, signal.SIGINT); proc.communicate(timeout=30)

`run` takes subprocess.run's arguments and `started` subprocess.Popen's (start_new_session is
always on); `still_running(proc.mark)` lists what is left of a start before the cleanup;
`terminal_signals()` gives the test's own process Ctrl-C as a terminal would, for a test that
signals itself."""
import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK_ENV = "ATTNSWEEP_TEST_PROCESS"  # space-separated marks: a started process's and its starters'
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
DEFAULT_TIMEOUT = 600  # no start waits forever; tests pass their own, smaller, budgets
_starts = itertools.count()


def child_env(env: dict | None = None, mark: str | None = None) -> dict:
    """`env` (default: this process's environment) with PYTHON naming this interpreter, plus
    `mark` appended to the marks it already carries."""
    env = dict(os.environ if env is None else env)
    env["PYTHON"] = sys.executable
    if mark:
        env[MARK_ENV] = f"{env.get(MARK_ENV, '')} {mark}".strip()
    return env


def _signals_need_reset() -> bool:
    """Whether a child would inherit an ignored or blocked terminal signal. Handlers this process
    installed are reset by exec; only SIG_IGN and the blocked mask survive it."""
    ignored = any(signal.getsignal(sig) == signal.SIG_IGN for sig in TERMINAL_SIGNALS)
    blocked = set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(TERMINAL_SIGNALS)
    return ignored or bool(blocked)


def _reset_signals_then(preexec_fn):
    def preexec():  # in the child, between fork and exec
        for sig in TERMINAL_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
        if preexec_fn is not None:
            preexec_fn()
    return preexec


def start(args, *, env: dict | None = None, preexec_fn=None, **popen) -> subprocess.Popen:
    """subprocess.Popen in its own session with the terminal's signal dispositions, PYTHON and a
    fresh mark (proc.mark). Prefer `started` or `run`: they also clean up."""
    mark = f"{os.getpid()}-{next(_starts)}-{secrets.token_hex(4)}"
    if _signals_need_reset() or preexec_fn is not None:
        # only then: a preexec_fn makes Popen fork the whole test process instead of vfork
        preexec_fn = _reset_signals_then(preexec_fn)
    proc = subprocess.Popen(args, env=child_env(env, mark), start_new_session=True, preexec_fn=preexec_fn, **popen)
    proc.mark = mark
    return proc


def _processes():
    """(pid, session id, state, environ bytes or None) of every process this user can read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                environ = None
            yield int(entry.name), int(fields[3]), fields[0], environ
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read


def _carries(environ: bytes | None, mark: str) -> bool:
    if not environ:
        return False
    for item in environ.split(b"\0"):
        if item.startswith(MARK_ENV.encode() + b"="):
            return mark.encode() in item.split(b"=", 1)[1].split()
    return False


def _left(proc: subprocess.Popen) -> list[int]:
    """Living processes (not zombies) started under `proc`: in its session or carrying its mark."""
    return [pid for pid, session, state, environ in _processes()
            if pid != os.getpid() and state not in ("Z", "X")
            and (session == proc.pid or _carries(environ, proc.mark))]


def still_running(mark: str) -> list[str]:
    """'pid command line' of each living process carrying `mark` (a start's proc.mark)."""
    found = []
    for pid, _, state, environ in _processes():
        if pid != os.getpid() and state not in ("Z", "X") and _carries(environ, mark):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append(f"{pid} {command.strip()}")
    return found


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Kill `proc` and everything started under it, and reap `proc`."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _left(proc)
        if proc.poll() is None:
            pids.append(proc.pid)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))


@contextlib.contextmanager
def started(args, **popen):
    """`start` as a context manager: on leaving it, however the test left it, `stop`."""
    proc = start(args, **popen)
    try:
        yield proc
    finally:
        stop(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run(args, *, input=None, capture_output: bool = False, timeout: float = DEFAULT_TIMEOUT, check: bool = False,
        **popen) -> subprocess.CompletedProcess:
    """subprocess.run through `started`: on a timeout the whole tree is killed before
    TimeoutExpired (with what it had printed) is raised."""
    if capture_output:
        popen["stdout"] = popen["stderr"] = subprocess.PIPE
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with started(args, **popen) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            try:  # what it printed: the pipes closed with the tree
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out = err = None
            raise subprocess.TimeoutExpired(args, timeout, output=out, stderr=err) from None
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


@contextlib.contextmanager
def terminal_signals():
    """In this (the test's) process, for a test that signals itself: SIGINT raises
    KeyboardInterrupt and no terminal signal is blocked, whatever the suite was started with.
    Must be entered on the main thread (signal.signal's rule); threads it starts inherit the mask."""
    before = signal.getsignal(signal.SIGINT)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
