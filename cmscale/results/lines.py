"""JSON lines to a typed frame: the new lines of ``metrics.jsonl`` files parsed into one polars frame
of :data:`~cmscale.results.schema.METRIC_SCHEMA` with ``sweep`` and ``run_id`` columns.

One fast parse (polars) when every line is valid; otherwise file by file, then block by block, and
row by row only in a block that holds a bad line: a line that is not a JSON object, or a value of
the wrong type, skips that row alone and is reported with its file, byte offset and field.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import polars as pl

from cmscale.results.files import MetricsChunk
from cmscale.results.ingest_report import IngestReport
from cmscale.results.schema import METRIC_SCHEMA


def _convert_value(value: Any, dtype: pl.DataType) -> Any:
    """``value`` as the column's type, or raise ValueError saying what was expected."""
    if value is None:
        return None
    if dtype == pl.String:
        if isinstance(value, str):
            return value
        raise ValueError("not a string")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    if dtype == pl.Int64:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        value = int(value)
        if not -(2**63) <= value < 2**63:
            raise ValueError("out of the 64-bit range")
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError("too large for a 64-bit float") from None


def _first_value_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


BLOCK_LINES = 2048  # a chunk the fast reader rejects is retried in blocks of this many lines


def _parse_lines_slowly(path: str, data: bytes, start: int, report: IngestReport) -> pl.DataFrame:
    """Row by row, for lines the fast reader rejected: a line that is not a JSON object, or a value
    of the wrong type, skips that row alone, reported as an error with its byte offset and field.
    ``data`` holds complete lines starting at byte ``start`` of the file at ``path``."""
    rows = []
    position = start
    for line in data.split(b"\n")[:-1]:
        offset = position
        position += len(line) + 1
        if not line.strip():
            continue
        try:
            # NaN and Infinity (which json.dumps writes) are accepted. A key given twice keeps its
            # first value, as the fast reader (polars) does: a line means the same in either path.
            row = json.loads(line, object_pairs_hook=_first_value_wins)
        except ValueError as error:
            report.error(path, f"byte {offset}: not a JSON line ({error}); row skipped")
            continue
        if not isinstance(row, dict):
            kind = type(row).__name__
            report.error(path, f"byte {offset}: expected a JSON object, got {kind}; row skipped")
            continue
        converted = {}
        for key, dtype in METRIC_SCHEMA.items():
            try:
                converted[key] = _convert_value(row.get(key), dtype)
            except ValueError as reason:
                shown = repr(row.get(key))
                report.error(path, f"byte {offset}: field {key!r} is {shown[:80]}, {reason}; row skipped")
                break
        else:
            rows.append(converted)
    if not rows:
        return pl.DataFrame(schema=METRIC_SCHEMA)
    return pl.from_dicts(rows, schema=METRIC_SCHEMA)


def _parse_in_blocks(chunk: MetricsChunk, report: IngestReport) -> pl.DataFrame:
    """A chunk the fast reader rejected, retried in blocks of BLOCK_LINES lines: only the blocks that
    hold a bad line (or NaN, which polars rejects) are parsed row by row, so one bad value costs the
    Python parse of one block, not of the whole file."""
    data = bytes(chunk.view)
    frames, block_start, offset = [], 0, chunk.start
    while block_start < len(data):
        block_end = block_start
        for _ in range(BLOCK_LINES):
            block_end = data.index(b"\n", block_end) + 1
            if block_end == len(data):
                break
        block = data[block_start:block_end]
        try:
            frame = pl.read_ndjson(io.BytesIO(block), schema=METRIC_SCHEMA)
            if frame.height != block.count(b"\n"):
                raise ValueError("blank lines")
        except Exception:  # noqa: BLE001 - polars rejects NaN/Infinity, malformed lines and wrong types
            frame = _parse_lines_slowly(str(chunk.seen.path), block, offset, report)
        frames.append(frame)
        offset += len(block)
        block_start = block_end
    return pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=METRIC_SCHEMA)


def _with_identity(frame: pl.DataFrame, chunk: MetricsChunk) -> pl.DataFrame:
    return frame.insert_column(0, pl.Series("run_id", [chunk.run_id] * frame.height, pl.String)).insert_column(
        0, pl.Series("sweep", [chunk.sweep] * frame.height, pl.String))


def parse_chunks(chunks: list[MetricsChunk], report: IngestReport) -> pl.DataFrame:
    """All chunks' rows with ``sweep`` and ``run_id`` columns, in file order (one fast parse when possible)."""
    chunks = [c for c in chunks if c.nbytes]
    if not chunks:
        return pl.DataFrame(schema={"sweep": pl.String, "run_id": pl.String, **METRIC_SCHEMA})
    counts = [c.count_lines() for c in chunks]
    try:
        frame = pl.read_ndjson(io.BytesIO(b"".join(c.view for c in chunks)), schema=METRIC_SCHEMA)
        if frame.height == sum(counts):  # blank lines would misalign run ids; then go file by file
            index = pl.Series(np.repeat(np.arange(len(chunks), dtype=np.uint32), counts))
            frame = frame.insert_column(0, pl.Series("run_id", [c.run_id for c in chunks], pl.String).gather(index))
            return frame.insert_column(0, pl.Series("sweep", [c.sweep for c in chunks], pl.String).gather(index))
    except Exception:  # noqa: BLE001 - polars rejects NaN/Infinity and malformed lines; go file by file
        pass
    frames = []
    for chunk in chunks:
        try:
            frame = pl.read_ndjson(io.BytesIO(bytes(chunk.view)), schema=METRIC_SCHEMA)
            if frame.height != chunk.count_lines():
                frame = _parse_in_blocks(chunk, report)
        except Exception:  # noqa: BLE001
            frame = _parse_in_blocks(chunk, report)
        frames.append(_with_identity(frame, chunk))
    return pl.concat(frames, how="vertical")
