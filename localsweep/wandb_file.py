"""Reading an offline W&B run's `.wandb` file: the run's history as W&B itself recorded it, which
is what the server's hyperband stopping reads online. Works on a file still being written (a run
in progress): a record whose last chunk is not there yet is left out."""
import json
import struct
from pathlib import Path

BLOCK = 32768


def wandb_log_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-style
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last). wandb 0.31 has no Python reader for it any more, so we have our own."""
    data, pos = path.read_bytes(), 7
    if data[:4] != b":W&B":
        return []
    records, pending = [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # padding, or a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def parsed_records(path: Path):
    """(kind, record) for each record of the file, as wandb's protobuf."""
    from wandb.proto import wandb_internal_pb2

    for data in wandb_log_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(data)
        except Exception:  # a torn record at the end of a file in progress
            continue
        yield record.WhichOneof("record_type"), record


def history_rows(record) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def run_history(wandb_dir: Path, run_id: str) -> list[dict]:
    """The history rows W&B recorded for run `run_id` under `wandb_dir`, oldest first, over every
    attempt of it (a resumed run logs into a new offline-run directory); a step logged again by a
    later attempt replaces the earlier row."""
    rows = {}
    for run_dir in sorted(wandb_dir.glob(f"offline-run-*-{run_id}")):
        for path in sorted(run_dir.glob("run-*.wandb")):
            for kind, record in parsed_records(path):
                if kind == "history":
                    row = history_rows(record)
                    rows[row.get("_step", record.history.step.num)] = row
    return [rows[step] for step in sorted(rows)]
