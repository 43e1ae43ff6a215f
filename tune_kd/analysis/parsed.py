"""What an analysis parsed, kept beside its results (`.parsed_results.arrow`), so that the next
analysis of the same experiment (the sweep's own at its end, a user's while it runs) parses only
the `result.json` files that changed: a file is parsed again unless its size and modification
time are those it had when parsed.

The file is one Arrow IPC table, a row per trial folder: its name, the file's size and
modification time, the numbers of its unreadable lines and its table as an Arrow IPC stream. A
file that cannot be read as such is ignored: everything is parsed again."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa

from tune_kd.analysis.read import Folder, Parsed
from tune_kd.storage import Storage

log = logging.getLogger(__name__)

PARSED_FILE = ".parsed_results.arrow"
SCHEMA = pa.schema(
    [
        ("folder", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("bad", pa.list_(pa.int64())),
        ("table", pa.large_binary()),
    ]
)


def read_parsed(storage: Storage) -> dict[str, Parsed]:
    """The parses kept in `storage` (a results folder), by trial folder; none when there is no
    such file or it is unreadable."""
    try:
        if not storage.exists(PARSED_FILE):
            return {}
        with pa.ipc.open_file(pa.py_buffer(storage.read(PARSED_FILE))) as reader:
            kept = reader.read_all()
        if not kept.schema.equals(SCHEMA):
            return {}
        rows = zip(*(kept.column(name).to_pylist() for name in SCHEMA.names[:4]))
        tables = kept.column("table").combine_chunks()
        return {
            folder: Parsed(size, mtime_ns, table_of(tables[i]), bad)
            for i, (folder, size, mtime_ns, bad) in enumerate(rows)
        }
    except (OSError, ValueError, TypeError, pa.ArrowException) as error:
        log.debug("%s unreadable, every result.json parsed again: %r", PARSED_FILE, error)
        return {}


def table_of(blob: pa.BinaryScalar) -> pa.Table:
    with pa.ipc.open_stream(blob.as_buffer()) as reader:
        table = reader.read_all()
    table.validate(full=True)
    return table


def write_parsed(
    storage: Storage, folders: Iterable[Folder], earlier: Mapping[str, Parsed]
) -> None:
    """Keep the folders' parses in `storage`, unless they are all `earlier`'s; a storage that
    cannot be written only means no parse is kept."""
    kept = {f.name: f.parsed for f in folders if f.parsed is not None and f.parsed.mtime_ns}
    if kept.keys() == earlier.keys() and all(p is earlier[n] for n, p in kept.items()):
        return
    columns = {
        "folder": list(kept),
        "size": [p.size for p in kept.values()],
        "mtime_ns": [p.mtime_ns for p in kept.values()],
        "bad": [p.bad for p in kept.values()],
        "table": binary_array([stream_bytes(p.results) for p in kept.values()]),
    }
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(pa.table(columns, schema=SCHEMA))
    try:
        storage.write(sink.getvalue().to_pybytes(), PARSED_FILE)
    except OSError as error:
        log.debug("%s not written: %r", PARSED_FILE, error)


def binary_array(blobs: list[bytes]) -> pa.LargeBinaryArray:
    """`blobs` as one Arrow array, built from one joined buffer and its offsets: a tenth of the
    time `pa.array` takes to copy them one by one."""
    offsets = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(blob) for blob in blobs], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(blobs))]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(blobs), buffers)


def stream_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
