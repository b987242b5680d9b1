"""A sweep on disk and its lock: <results_dir>/<sweep_id>/ with sweep.yaml, sweep_state.json,
logs/ and wandb/."""
import json
import os
import time
from pathlib import Path

from record import one_line, write_json_atomic

from .common import SweepError

STATE_FILE = "sweep_state.json"
STATE_SCHEMA = 1



class Sweep:
    """One sweep on disk: <results_dir>/<sweep_id>/ with sweep.yaml, sweep_state.json, logs/, wandb/."""

    def __init__(self, sweep_dir: Path, state: dict):
        self.dir = sweep_dir
        self.state = state
        self.reports: list[Path] = []  # the reports this process wrote of it (localsweep.table.summarize)

    @property
    def id(self) -> str:
        return self.state["sweep_id"]

    @property
    def runs(self) -> list[dict]:
        return self.state["runs"]

    def save(self) -> None:
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(self.dir / STATE_FILE, self.state)

    def lock(self) -> None:
        """One local_sweep per sweep at a time: a second one (a --resume while the first still
        runs) is refused rather than running the same runs twice. Held until this process ends."""
        import fcntl

        self._lock = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            raise SweepError(f"sweep {self.id} is being run by another local_sweep.py (pid {holder}); "
                             f"wait for it or stop it first") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    @classmethod
    def load(cls, sweep_dir: Path) -> "Sweep":
        try:
            state = json.loads((sweep_dir / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise SweepError(f"{sweep_dir / STATE_FILE}: cannot read the sweep's state ({one_line(err)})") from None
        if not isinstance(state, dict) or state.get("state_schema") != STATE_SCHEMA or "runs" not in state:
            raise SweepError(f"{sweep_dir / STATE_FILE}: not a local_sweep state file")
        return cls(sweep_dir, state)
