"""The test session's own machine state (issue 22): two suites (or two workers) on one machine
share no cache, and none left by someone else can fail them.

Set once, before any test module is imported, in this process's environment, so every process a
test starts inherits it: a private HOME (W&B's settings, logs and artifact staging, the HF token
and hub caches, matplotlib's font cache all live under it; XDG_* and HF_HOME too, which would
override it), a private TORCHINDUCTOR_CACHE_DIR (inductor's default is shared in /tmp: two
processes compiling at once left a truncated .so there, and every later compile test on that
machine failed to import it) and TMPDIR (inductor's precompiled headers live under it), no W&B credentials or settings from the caller's environment, W&B
offline, PYTHON naming this interpreter (scripts the tests start run "${PYTHON:-python3}"), and one
torch thread a process (OMP_NUM_THREADS, MKL_NUM_THREADS; a test about thread counts sets its own):
the tests' models are tiny, and a test's process, a sweep and its run, each with a thread a core, and
whatever else runs on the machine oversubscribe the cores. On 2 cores, a 285-test subset took 49 s
against 91 s with torch's default under load (~1.5; 58 s against 144 s at ~3), and the same, 48 s, on
a nearly idle machine."""
import os
import shutil
import sys
import tempfile

import pytest

_saved_environ: dict | None = None
_session_dir: str | None = None

# where the caller's W&B identity or target would leak into a test
CALLER_ONLY = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_SWEEP_ID",
               "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_DIR", "WANDB_CONFIG_DIR",
               "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_SERVICE", "NETRC", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN")


def session_environment(root: str) -> dict:
    """The variables this session sets, each private directory under `root`."""
    home = os.path.join(root, "home")
    return {"HOME": home, "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"), "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
            "XDG_STATE_HOME": os.path.join(home, ".local", "state"),
            "HF_HOME": os.path.join(home, ".cache", "huggingface"),
            "MPLCONFIGDIR": os.path.join(home, ".config", "matplotlib"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"), "TRITON_CACHE_DIR": os.path.join(root, "triton"),
            # inductor keeps its precompiled C++ headers outside TORCHINDUCTOR_CACHE_DIR, in
            # <tempdir>/torchinductor_<user>/precompiled_headers (torch/_inductor/codecache.py,
            # _HEADER_DIR: shared on purpose, 155 MB a set), and takes one that exists as built: a
            # truncated one fails every kernel compile. A private temp dir makes them the session's
            # too (a fresh machine, as CI's, builds them either way: ~10 s a set of flags, measured)
            "TMPDIR": os.path.join(root, "tmp"),
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_configure(config):
    global _saved_environ, _session_dir
    _saved_environ = dict(os.environ)
    _session_dir = tempfile.mkdtemp(prefix="attnsweep-tests-")
    for key in CALLER_ONLY:
        os.environ.pop(key, None)
    for key, value in session_environment(_session_dir).items():
        if value.startswith(_session_dir):
            os.makedirs(value, exist_ok=True)
        os.environ[key] = value
    tempfile.tempdir = None  # gettempdir() caches its answer: from now on it is TMPDIR's
    if "torch" in sys.modules:  # imported before this hook (a plugin): it has read its thread count already
        sys.modules["torch"].set_num_threads(1)


def pytest_unconfigure(config):
    if _saved_environ is not None:
        os.environ.clear()
        os.environ.update(_saved_environ)
    if _session_dir is not None:
        shutil.rmtree(_session_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _one_torch_thread_again():
    """A test that sets torch's thread count (bench mains called in-process: --threads) does not
    leave it for the tests after it in the same process (under pytest-xdist, a worker's later tests
    ran on 2 threads once bench.layer's test had set 1 -> 2 elsewhere)."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
