"""Runs of train.py forked from this process after its imports, instead of started afresh.

A fresh Python process spends seconds importing torch, accelerate, datasets and wandb before a
run's first step (2026-11-28, 2-core CPU shared with other jobs, load 4: torch 3.8 s, accelerate +
datasets 1.6 s, wandb 1.5 s). Here they are imported once, and each run is os.fork()ed: still its
own process (own pid and process group, own W&B run, record and exit code; a crash or a kill ends
only that run), started without paying the imports again -- a fork server, as W&B's own
`wandb.agent(function=...)` saves the start-up by running runs inside one process, but with a
process per run kept. Only for the default command (`${env} ${interpreter} ${program} ${args}`)
with train.py as the program: any other command runs as a subprocess, exactly as `wandb agent` would.

wandb is imported here but never initialised, so each child's wandb.init starts its own service
as a fresh process would. With --parallel N, other runs' output pumps are threads of this process
when a run is forked: the child never touches what they hold (their pipes and log files, which it
closes, and the screen lock); everything it uses it sets up afresh (its stdin, stdout, stderr and
environment, its torch thread count).
"""
import io
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .macros import DEFAULT_COMMAND

# What train.py imports, at module level or lazily inside a run: imported once, before any fork.
# The rest are what a forked run still imported on its own (878 modules, 2026-11-28): every torch
# optimizer's __init__ imports torch._dynamo (and with it sympy: 5.3 s of a smoke run's start-up
# at load 10 on 2 cores), accelerate torch.distributed, wandb.init its run, launch and API modules.
PRELOAD = ("torch", "accelerate", "datasets", "tokenizers", "tqdm", "psutil", "wandb", "train", "data",
           "torch._dynamo", "torch.distributed", "wandb.sdk.wandb_run", "wandb.sdk.launch", "wandb.apis.public")


def can_fork(command, program: str) -> bool:
    """The default command running train.py, on a system with fork."""
    return (hasattr(os, "fork") and [str(c) for c in (command or DEFAULT_COMMAND)] == DEFAULT_COMMAND
            and Path(program).name == "train.py")


def preload(program: str) -> bool:
    """Import train.py (from its directory) and what it imports; False if any import fails, and the
    runs then start as subprocesses (where the failure shows up in the run's own log)."""
    directory = str(Path(program).resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        for name in PRELOAD:
            __import__(name)
    except Exception:  # noqa: BLE001 - any import failure: fall back to the plain path
        return False
    return Path(sys.modules["train"].__file__).resolve() == Path(program).resolve()


class ForkedRun:
    """A forked run, with what runner.wait_for and signal_group use of a subprocess.Popen: pid,
    stdout (its output, stderr included), wait([timeout]) -> exit code (negative: killed by that
    signal)."""

    def __init__(self, argv: list[str], env: dict, close_fds: tuple = (), threads: int | None = None):
        """close_fds: this process's descriptors the run must not hold (the sweep's lock: a run
        that outlived a killed sweep would keep it locked; the pipes and logs of the other runs in
        flight: a run holding another's pipe keeps that one writing into a pipe nobody reads after
        the sweep is killed); Popen closes them all, a fork cannot, since the imported modules' own
        descriptors must stay. threads: the run's torch threads (None: as inherited)."""
        args = argv[3:]  # after /usr/bin/env, the interpreter and train.py: the run's --name=value args
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # the run
            os.close(read_end)
            for fd in close_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            _run_child(argv[2], args, env, write_end, threads)  # never returns
        os.close(write_end)
        try:
            os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
        except OSError:
            pass
        self.pid, self.returncode = pid, None
        self.stdout = os.fdopen(read_end, "rb")

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["train.py"], timeout)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.returncode


def _run_child(program: str, args: list[str], env: dict, output_fd: int, threads: int | None = None) -> None:
    """In the forked child: become the run's own process, as Popen(process_group=0, stdin=DEVNULL,
    stdout=PIPE, stderr=STDOUT, env=env) would have started it, run train.main, exit with its code.
    torch read OMP_NUM_THREADS when this process imported it, so a thread count in the run's
    environment must be set by hand here, before the run computes anything."""
    code = 1
    try:
        os.setpgid(0, 0)
        # the sweep's handlers (Stop on SIGTERM/SIGHUP) are not the run's: train.py sets its own
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        os.close(devnull)
        # PYTHONUNBUFFERED, as the subprocess has it: every write goes out at once
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True)
        sys.stdin = open(os.devnull)
        os.environ.clear()
        os.environ.update(env)
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
        sys.argv = [program, *args]
        code = sys.modules["train"].main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a fresh process
        traceback.print_exc()
        code = 1
    finally:
        try:
            if "wandb" in sys.modules:  # what wandb's atexit hook would do: end this process's service
                sys.modules["wandb"].teardown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)
