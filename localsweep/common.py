"""What every part of the local agent shares: the two ways it stops early (bad input, a signal),
ids, and small helpers. (Text, number and file helpers live in record.py, the run's contract.)"""
import json
import secrets
import string
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py lives here
ID_ALPHABET = string.ascii_lowercase + string.digits


class SweepError(Exception):
    """Bad input: one line for the user, exit 2."""


class Stop(BaseException):
    """SIGTERM / SIGHUP to this script, handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def new_id(n: int = 8) -> str:
    """Eight lowercase letters and digits, like W&B's sweep and run ids."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(n))


def import_engine():
    """W&B's sweep engine, without the pydantic deprecation warning it prints on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def plain(values: dict) -> dict:
    """The engine's values as the W&B server hands them to an agent: through JSON (numpy
    scalars become Python numbers)."""
    return json.loads(json.dumps(values, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
