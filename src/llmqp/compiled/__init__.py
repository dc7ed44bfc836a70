"""The fused on-device decode loop for regular constraints, and StableHLO export.

    tables = constraint_tables(engine, {"regex": ...})          # ConstraintTables | Fallback
    out = run_fused(engine, prompt_ids, tables, sampling, 64)    # one lax.while_loop, no host round trips
    result = generate_fused(engine, prompt, regex=...)           # GenerationResult | Fallback
    export(engine, prompt, "out/", regex=...)                    # artifact directory
    load_exported("out/").generate("new prompt")                 # JAX + tokenizers only

What runs fused: regexes, choices, and compact-whitespace JSON schemas that reduce to a finite automaton
(see `regular.py`), with tables within `TableLimits`. Everything else returns a `Fallback` with the
reason: grammars, recursive or free-form JSON, formats/patterns, oversized automata.
"""

from llmqp.compiled.api import constraint_tables, generate_fused, replay_on_host
from llmqp.compiled.compile import compile_tables
from llmqp.compiled.compile_log import CompileLog
from llmqp.compiled.export import ExportInfo, export
from llmqp.compiled.loop import FusedConfig, FusedOutput, default_sparse_threshold, run_fused, table_shape
from llmqp.compiled.runtime import ExportedGenerator, ExportedResult, load_exported
from llmqp.compiled.tables import (ConstraintTables, Fallback, TableLimits, synthetic_tables, tables_from_rows,
                                   unconstrained_tables)

__all__ = ["CompileLog", "ConstraintTables", "ExportInfo", "ExportedGenerator", "ExportedResult", "Fallback",
           "FusedConfig", "FusedOutput", "TableLimits", "compile_tables", "constraint_tables",
           "default_sparse_threshold", "export", "generate_fused", "load_exported", "replay_on_host", "run_fused",
           "synthetic_tables", "table_shape", "tables_from_rows", "unconstrained_tables"]
