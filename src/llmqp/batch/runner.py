"""Rows through the scheduler with continuous batching, and the resumable single-process `run_batch`.

`run_rows` is the one loop every batch path drives (the CLI, `run_batch`, `llmqp.ray.Extractor`): it keeps
up to `2 * max_batch` requests queued in the scheduler (so a slot freed in one tick is refilled in the
next), steps it, and yields each row's output as soon as its request finishes — in completion order, not
input order. It owns the scheduler: nothing else may step it meanwhile.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from llmqp.batch.output import OutputFile, output_row
from llmqp.batch.rows import BatchConfig, InputRow, read_input, scan_input
from llmqp.errors import LLMQPError


def run_rows(engine, rows: Iterable[InputRow], *, max_batch: int,
             on_tokens: Callable[[int], None] | None = None) -> Iterator[tuple[InputRow, dict, object]]:
    """Yield (row, output row, GenerationResult or None) for every row, as each finishes. Rows that carry an
    error, whose options the scheduler rejects, or whose generation fails (a bad schema, a prompt past the
    context) yield an error output (and None); the others go on. on_tokens(n) is called with the number of
    tokens each tick produced. max_batch: the scheduler's slots."""
    from llmqp import FinishedEvent, Scheduler, TokenEvent

    scheduler = Scheduler(engine, max_slots=max_batch)
    pending = iter(rows)
    in_flight: dict[str, InputRow] = {}
    exhausted = False
    serial = 0
    while True:
        while not exhausted and len(in_flight) < 2 * max_batch:
            row = next(pending, None)
            if row is None:
                exhausted = True
                break
            if row.error is not None:
                yield row, output_row(row.id, error=row.error), None
                continue
            serial += 1
            try:
                request_id = scheduler.add_request(row.request, request_id=f"row-{serial}")
            except LLMQPError as e:
                yield row, output_row(row.id, error=f"{row.where}: {e}"), None
                continue
            in_flight[request_id] = row
        if not in_flight:
            return
        for event in scheduler.step():
            if isinstance(event, TokenEvent):
                if on_tokens is not None:
                    on_tokens(len(event.token_ids))
            elif isinstance(event, FinishedEvent):
                row = in_flight.pop(event.request_id)
                yield row, output_row(row.id, event.result), event.result


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """What one `run_batch` did. rows: input rows; skipped: already in the output before this run;
    done: written by this run (errors included); errors: error lines this run wrote; output_tokens:
    generated tokens; seconds: wall time of the generation part."""

    rows: int
    skipped: int
    done: int
    errors: int
    output_tokens: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.done} rows in {self.seconds:.1f} s ({self.rows_per_second:.2f} rows/s, "
                f"{self.tokens_per_second:.1f} output tok/s), {self.errors} error rows, "
                f"{self.skipped} already in the output, {self.rows} in the input")


class Progress:
    """A tqdm bar over rows (rows done, rows/s, ETA) with output tok/s in its postfix; counts tokens."""

    def __init__(self, total: int, initial: int, enabled: bool | None):
        from tqdm import tqdm

        self.started = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, file=sys.stderr,
                        disable=False if enabled else None if enabled is None else True, smoothing=0.1)

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def row_done(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix_str(f"{self.tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def note(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run_batch(engine, input_path: str | Path, output_path: str | Path, config: BatchConfig, *,
              progress: bool | None = None, fsync: bool = True) -> BatchSummary:
    """Generate one output line per input row of `input_path` into `output_path`, resuming: rows whose id
    already has a line in the output are skipped, so re-running after a kill finishes the file with every
    row exactly once. Lines are appended and fsync'ed as rows finish (completion order).

    progress: True shows the bar, None shows it when stderr is a terminal, False hides it. Error rows
    (bad input lines with their line number, rejected options, failed generations) are written as error
    lines and reported on stderr. Raises LLMQPError when the input or the output file is unusable, and
    InvalidArgument / ConstraintError for a bad shared option or constraint (before any row runs)."""
    config.check(engine)
    ids = scan_input(input_path)
    with OutputFile.open(output_path, fsync=fsync) as out:
        skipped = sum(1 for key in ids if key in out.done)
        bar = Progress(total=len(ids), initial=skipped, enabled=progress)
        done = errors = 0
        try:
            rows = read_input(input_path, config, skip=set(out.done))
            for row, result, _ in run_rows(engine, rows, max_batch=config.max_batch, on_tokens=bar.add_tokens):
                out.write(result)
                done += 1
                if result["finish_reason"] == "error":
                    errors += 1
                    error = result["error"]
                    bar.note(f"llmqp batch: {error if error.startswith(row.where) else f'{row.where}: {error}'}")
                bar.row_done()
        finally:
            bar.close()
        return BatchSummary(rows=len(ids), skipped=skipped, done=done, errors=errors, output_tokens=bar.tokens,
                            seconds=time.perf_counter() - bar.started)
