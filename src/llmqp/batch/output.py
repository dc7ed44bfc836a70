"""The output file of `llmqp batch`: one JSON line per input row, appended durably, resumable after a kill.

Each line is written with a single `write(2)` on a file opened with O_APPEND, then fsync'ed: a killed
process leaves either the whole line or none of it. A crash of the machine (or a full disk) can still
leave a torn last line; `OutputFile.open` cuts it off, so the row is simply done again.

Output rows: {"id", "text", "value", "valid", "finish_reason", "error"} — `value` is the parsed JSON of a
valid json_schema output (else null); `error` is null unless finish_reason is "error".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmqp.batch.rows import id_key
from llmqp.errors import LLMQPError

OUTPUT_FIELDS = ("id", "text", "value", "valid", "finish_reason", "error")


def output_row(row_id: Any, result=None, error: str | None = None) -> dict:
    """The output line of one row: from a `GenerationResult`, or an error row when `result` is None."""
    if result is None:
        return {"id": row_id, "text": "", "value": None, "valid": False, "finish_reason": "error", "error": error}
    return {"id": row_id, "text": result.text, "value": result.value, "valid": bool(result.valid),
            "finish_reason": result.finish_reason, "error": result.error}


def _parse_output_line(raw: bytes) -> dict | None:
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "id" in row else None


class OutputFile:
    """An append-only JSONL output. `done` holds the id_keys already written (by earlier runs too)."""

    def __init__(self, path: Path, fd: int, done: set[str], *, fsync: bool):
        self.path = path
        self._fd = fd
        self.done = done
        self._fsync = fsync

    @classmethod
    def open(cls, path: str | Path, *, fsync: bool = True) -> "OutputFile":
        """Open (creating it if needed) for appending, after reading the ids already written.

        A last line without its newline or that is not valid JSON is a torn write: the file is truncated
        to the end of the last complete line. Raises LLMQPError for a damaged line before the last (not
        something this writer leaves: the file was edited or is not an output of `llmqp batch`)."""
        path = Path(path)
        done: set[str] = set()
        if path.exists():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise LLMQPError(f"cannot read output {path}: {e.strerror}") from None
            lines = data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]  # complete lines; a tail without "\n" is torn
            good_end = 0
            for number, raw in enumerate(lines, start=1):
                if raw.strip():
                    row = _parse_output_line(raw)
                    if row is None:
                        if any(rest.strip() for rest in lines[number:]):
                            raise LLMQPError(f"output {path} line {number} is damaged; not resuming over it "
                                             f"(move the file away to start over)")
                        break  # a damaged last line: torn too
                    done.add(id_key(row["id"]))
                good_end += len(raw) + 1
            if good_end < len(data):
                with open(path, "r+b") as f:
                    f.truncate(good_end)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise LLMQPError(f"cannot write output {path}: {e.strerror}") from None
        return cls(path, fd, done, fsync=fsync)

    def write(self, row: dict) -> None:
        """Append one output row durably (one write, then fsync) and record its id as done."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop only for the odd short write
            view = view[os.write(self._fd, view):]
        if self._fsync:
            os.fsync(self._fd)
        self.done.add(id_key(row["id"]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
