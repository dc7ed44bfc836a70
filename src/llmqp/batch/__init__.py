"""Offline batch extraction: `llmqp batch` (resumable JSONL through the scheduler) and its building blocks.

`run_batch(engine, input, output, BatchConfig(...))` is the library form of the command; `run_rows` is the
loop it (and `llmqp.ray.Extractor`) drives."""

from llmqp.batch.output import OUTPUT_FIELDS, OutputFile, output_row
from llmqp.batch.rows import BatchConfig, InputRow, RowError, read_input, scan_input
from llmqp.batch.runner import BatchSummary, run_batch, run_rows

__all__ = ["OUTPUT_FIELDS", "BatchConfig", "BatchSummary", "InputRow", "OutputFile", "RowError", "output_row",
           "read_input", "run_batch", "run_rows", "scan_input"]
