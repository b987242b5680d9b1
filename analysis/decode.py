"""Measured serving cost: bench.decode's rows (load), one decode speed per variant at a stated
context and batch (compute), which the report's cost figure plots loss against (plots.costs_figure).
No torch: the file is plain JSON (a list of rows, bench/decode.py)."""
import json
from dataclasses import dataclass
from pathlib import Path

from analysis.runs import SourceError

NEEDED = ("variant", "context", "batch", "status")


@dataclass
class DecodeSpeeds:
    source: str  # the file read
    context: int  # the cache length every speed is at
    batch: int
    machine: str
    tokens_per_s: dict  # variant -> decode tokens/s
    limit_ratio: dict  # variant -> measured / the memory-bandwidth limit

    def caption(self) -> str:
        return (f"decode tokens/s at context {self.context:,}, batch {self.batch} (bench.decode, {self.machine}; "
                f"MLA: its absorbed step), from `{self.source}`")


def load(path) -> list[dict]:
    """The ok rows of a bench.decode --out file."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"--decode {path}: not a readable JSON file ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in NEEDED) for r in rows):
        raise SourceError(f"--decode {path}: expected bench.decode's JSON list of rows (with {', '.join(NEEDED)})")
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise SourceError(f"--decode {path}: no measured rows (status ok)")
    return ok


def speeds(rows: list[dict], source: str, context: int | None = None, batch: int | None = None) -> DecodeSpeeds:
    """Each variant's decode speed at `context` (default: the longest every variant has) and `batch`
    (default: the smallest); an MLA variant's absorbed row where there is one (the default step)."""
    batch = min(r["batch"] for r in rows) if batch is None else batch
    at_batch = [r for r in rows if r["batch"] == batch]
    if not at_batch:
        raise SourceError(f"--decode-batch {batch}: not in the file; it has {sorted({r['batch'] for r in rows})}")
    variants = {r["variant"] for r in at_batch}
    if context is None:
        common = set.intersection(*({r["context"] for r in at_batch if r["variant"] == v} for v in variants))
        context = max(common or {r["context"] for r in at_batch})
    chosen = {}
    for r in sorted(at_batch, key=lambda r: r.get("mla_decode") == "absorbed"):  # absorbed last: it wins
        if r["context"] == context:
            chosen[r["variant"]] = r
    if not chosen:
        raise SourceError(f"--decode-context {context}: not in the file at batch {batch}; it has "
                          f"{sorted({r['context'] for r in at_batch})}")
    machine = next(iter(chosen.values())).get("machine") or "unknown machine"
    return DecodeSpeeds(str(source), context, batch, machine, {v: r["decode_tokens_per_s"] for v, r in chosen.items()},
                        {v: r["limit_ratio"] for v, r in chosen.items()})
