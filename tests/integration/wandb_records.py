"""Read back what a W&B run wrote offline, from its ``run-*.wandb`` transaction log.

The file is a ``:W&B`` header followed by LevelDB-style log blocks (32 KiB, 7-byte chunk headers:
crc32, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    records, pending, pos = [], b"", 7
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    files_dir: Path | None = None

    def logged(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def finished_records(log_file: Path, wait_s: float = 30.0) -> list[bytes]:
    """The file's records once the run's ``exit`` record is in it (at most ``wait_s`` seconds later).

    ``wandb.finish()`` returns when the service has the records; on a loaded machine the file can lag.
    """
    deadline = time.monotonic() + wait_s
    while True:
        records = _chunks(log_file.read_bytes())
        last = wandb_internal_pb2.Record()
        if records:
            last.ParseFromString(records[-1])
        if last.WhichOneof("record_type") == "exit" or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_offline_run(run_dir: Path, wait_s: float = 30.0) -> OfflineRun:
    """Parse ``<run_dir>/run-*.wandb`` (``run_dir`` = ``wandb/offline-run-*``)."""
    log_file = next(Path(run_dir).glob("run-*.wandb"))
    run = OfflineRun(files_dir=Path(run_dir) / "files")
    for raw in finished_records(log_file, wait_s):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
    return run
