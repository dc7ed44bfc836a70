"""Ray Data: batch extraction over many processes or machines, one engine per actor.

    import ray, llmqp.ray
    ds = ray.data.read_json("docs.jsonl")
    out = ds.map_batches(llmqp.ray.Extractor, concurrency=2, batch_size=16,
                         fn_constructor_kwargs=dict(template="Extract the person: {text}", json_schema=schema,
                                                    max_tokens=128))

`Extractor(**kwargs)` takes `model`, `dtype` and `devices` (for `llmqp.Engine`) and the fields of
`llmqp.batch.BatchConfig`; each actor loads its own engine once and runs every batch it gets through the
scheduler (`llmqp.batch.run_rows`), so rows of one batch are decoded together. Input columns: the prompt
field (or the template's fields), optional `id`, optional per-row `json_schema` / `regex` / `choice` /
`grammar` — or one column `llmqp_row` holding each row as JSON text (what `llmqp batch --ray` sends: rows
with different fields and nested values pass through Arrow intact). Output columns, one row per input row
in input order: `id` (the input's `id` column as is, else null), `text`, `value` (the parsed value *as JSON
text*: Arrow would merge the keys of different objects), `valid`, `finish_reason`, `error`, and
`output_tokens`.

Ray is an optional extra (`pip install 'llmqp[ray]'`), imported only when used. Greedy outputs equal the
single-process path's: both run the same rows through the same scheduler loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from llmqp.batch.output import OutputFile, output_row
from llmqp.batch.rows import BatchConfig, InputRow, RowError, _lines, id_key, parse_line, scan_input
from llmqp.batch.runner import BatchSummary, Progress, run_rows
from llmqp.errors import LLMQPError

ROW_COLUMN = "llmqp_row"
OUTPUT_COLUMNS = ("id", "text", "value", "valid", "finish_reason", "error", "output_tokens")


def import_ray():
    """The `ray` module; LLMQPError naming the extra to install when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LLMQPError("Ray is not installed: pip install 'llmqp[ray]' (or pip install 'ray[data]')") from None
    return ray


def _plain(value):
    """Numpy scalars/arrays (as Ray hands batches over) -> Python values; NaN (pandas' missing) -> None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype != object else [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def batch_rows(batch) -> list[dict]:
    """A Ray batch (a dict of numpy arrays, a pandas DataFrame or a pyarrow Table) -> one dict per row, plain
    Python."""
    if hasattr(batch, "to_pylist"):  # pyarrow
        return [{k: _plain(v) for k, v in record.items()} for record in batch.to_pylist()]
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return [{k: _plain(v) for k, v in record.items()} for record in batch.to_dict("records")]
    columns = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: _plain(columns[k][i]) for k in columns} for i in range(n)]


class Extractor:
    """A Ray Data callable class: `ds.map_batches(Extractor, fn_constructor_kwargs=..., concurrency=N)`.

    __init__ loads one `llmqp.Engine(model, dtype=dtype, devices=devices)` per actor and checks the shared
    options and constraint (raising InvalidArgument / ConstraintError, which fails the actor). __call__(batch)
    returns the output columns (see the module docstring); a bad row becomes an error row, never an exception."""

    def __init__(self, *, model: str | None = None, dtype: str = "float32", devices=None, **config):
        from llmqp import Engine

        self.config = BatchConfig(**config)
        self.config.check()
        self.engine = Engine(model, dtype=dtype, devices=devices)
        self.config.check(self.engine)

    def _input_row(self, index: int, row: dict) -> InputRow:
        row_id = row.get("id")
        if ROW_COLUMN in row:
            try:
                row = json.loads(row[ROW_COLUMN])
            except (TypeError, ValueError) as e:
                return InputRow(None, row_id, error=f"row {index}: {ROW_COLUMN} is not JSON text: {e}")
        try:
            return InputRow(None, row_id, request=self.config.request_for(row))
        except RowError as e:
            return InputRow(None, row_id, error=f"row {row_id if row_id is not None else index!r}: {e}")

    def __call__(self, batch) -> dict:
        rows = [self._input_row(i, row) for i, row in enumerate(batch_rows(batch))]
        position = {id(row): i for i, row in enumerate(rows)}
        outputs: list = [None] * len(rows)
        tokens = [0] * len(rows)
        for row, out, result in run_rows(self.engine, rows, max_batch=self.config.max_batch):
            outputs[position[id(row)]] = out
            tokens[position[id(row)]] = len(result.token_ids) if result is not None else 0
        return {
            "id": _column([o["id"] for o in outputs]),
            "text": _column([o["text"] for o in outputs]),
            "value": _column([None if o["value"] is None else json.dumps(o["value"], ensure_ascii=False)
                              for o in outputs]),
            "valid": np.array([o["valid"] for o in outputs], dtype=bool),
            "finish_reason": _column([o["finish_reason"] for o in outputs]),
            "error": _column([o["error"] for o in outputs]),
            "output_tokens": np.array(tokens, dtype=np.int64),
        }


def _column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def run_batch_ray(input_path: str | Path, output_path: str | Path, config: BatchConfig, *, model=None,
                  dtype: str = "float32", devices=None, address: str | None = None, actors: int = 1,
                  progress: bool | None = None, fsync: bool = True) -> BatchSummary:
    """`run_batch` on Ray Data: the rows not yet in the output go through `actors` Extractor actors and
    each returned row is appended to the output as it arrives (resumable the same way; a kill loses the
    rows of the tasks in flight: batches of 2 * max_batch rows, which Ray may bundle). Malformed input lines are written as error rows by the
    driver. Connects to `address` (default: RAY_ADDRESS or a new local cluster) unless Ray is already
    initialised; shuts down only a cluster it started. Rows are held in the driver's memory."""
    ray = import_ray()
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        from llmqp.sampling import InvalidArgument

        raise InvalidArgument(f"actors must be a positive integer, got {actors!r}")
    config.check()
    ids = scan_input(input_path)
    _check_shared_constraint(config, model)
    with OutputFile.open(output_path, fsync=fsync) as out:
        skipped = sum(1 for key in ids if key in out.done)
        bar = Progress(total=len(ids), initial=skipped, enabled=progress)
        done = errors = 0
        items = []
        try:
            for number, text in _lines(Path(input_path)):
                row_id, row, error = parse_line(number, text)
                if id_key(row_id) in out.done:
                    continue
                if error is not None:
                    out.write(output_row(row_id, error=error))
                    done, errors = done + 1, errors + 1
                    bar.note(f"llmqp batch: {error}")
                    bar.row_done()
                    continue
                items.append({"id": id_key(row_id), ROW_COLUMN: json.dumps(dict(row, id=row_id), ensure_ascii=False)})
            if items:
                started = not ray.is_initialized()
                if started:
                    ray.init(address=address, log_to_driver=False)
                try:
                    ray.data.DataContext.get_current().enable_progress_bars = False
                    # Blocks of one batch (2 * max_batch rows) and one task in flight per actor: actors share
                    # the rows, and rows come back (to the output: the resume point) task by task. Ray may
                    # still bundle several blocks into one task.
                    batch_size = 2 * config.max_batch
                    rows = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
                    rows = rows.map_batches(
                        Extractor, fn_constructor_kwargs=dict(model=model, dtype=dtype, devices=devices,
                                                              **_config_kwargs(config)),
                        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                        batch_size=batch_size)
                    for result in rows.iter_rows():
                        line = {"id": json.loads(result["id"]), "text": result["text"],
                                "value": None if result["value"] is None else json.loads(result["value"]),
                                "valid": bool(result["valid"]), "finish_reason": result["finish_reason"],
                                "error": result["error"]}
                        out.write(line)
                        done += 1
                        bar.add_tokens(int(result["output_tokens"]))
                        if line["finish_reason"] == "error":
                            errors += 1
                            bar.note(f"llmqp batch: row {line['id']!r}: {line['error']}")
                        bar.row_done()
                finally:
                    if started:
                        ray.shutdown()
        finally:
            bar.close()
        return BatchSummary(rows=len(ids), skipped=skipped, done=done, errors=errors, output_tokens=bar.tokens,
                            seconds=time.perf_counter() - bar.started)


def _check_shared_constraint(config: BatchConfig, model) -> None:
    """Compile the shared constraint in the driver (with the model's tokenizer, loaded from the weight
    cache): a bad one then fails the run with one ConstraintError line instead of every actor dying in its
    constructor with a traceback."""
    if config.constraint_kw() is None:
        return
    from llmqp.constraints import compile_constraint, make_spec
    from llmqp.model import loader

    compile_constraint(make_spec(**config.constraint_kw()), loader.load(model).tokenizer)


def _config_kwargs(config: BatchConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
