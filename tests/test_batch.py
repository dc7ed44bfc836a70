"""`llmqp batch`: input rows, the resumable output file, the scheduler loop, and a real SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmqp
from llmqp.batch import BatchConfig, OutputFile, output_row, read_input, run_batch, scan_input
from llmqp.batch.rows import id_key


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ input rows
def test_rows_ids_prompts_and_malformed_lines(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        {"prompt": "first"},                       # line 1: id defaults to the line number
        {"id": "b", "prompt": "second"},
        "",                                        # blank lines are not rows
        "{not json",                               # line 4
        "[1, 2]",                                  # line 5: not an object
        {"id": 2.5, "prompt": "x"},                # line 6: bad id type
        {"id": "c", "text": "no prompt field"},    # line 7
        {"id": "d", "prompt": "own regex", "regex": "[0-9]+"},
    ])
    config = BatchConfig(json_schema={"type": "object"}, max_tokens=7)
    rows = list(read_input(src, config))
    assert [(r.line, r.id) for r in rows] == [(1, 1), (2, "b"), (4, 4), (5, 5), (6, 6), (7, "c"), (8, "d")]
    assert rows[0].request == {"prompt": "first", "json_schema": {"type": "object"}, "max_tokens": 7,
                               "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "raw": False,
                               "strict": True, "whitespace": "compact", "plan": "auto", "forced": True,
                               "draft": "auto"}
    assert rows[2].error.startswith("input line 4: invalid JSON")
    assert rows[3].error == "input line 5: expected a JSON object, got list"
    assert rows[4].error == "input line 6: id must be a string or an integer, got 2.5"
    assert rows[5].error.startswith("input line 7: no 'prompt' field")
    # A row's own constraint replaces the shared one.
    assert rows[6].request["regex"] == "[0-9]+" and "json_schema" not in rows[6].request
    assert all(r.request is None for r in rows[2:6])
    assert scan_input(src) == {"1": 1, '"b"': 2, "4": 4, "5": 5, "6": 6, '"c"': 7, '"d"': 8}
    # Skipping by id (resume) drops exactly those rows.
    assert [r.id for r in read_input(src, config, skip={id_key(1), id_key("c")})] == ["b", 4, 5, 6, "d"]


def test_duplicate_ids_and_missing_input_fail_the_run(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"id": 3, "prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    with pytest.raises(llmqp.LLMQPError, match="input line 3: id 3 already used on line 1"):
        scan_input(src)
    with pytest.raises(llmqp.LLMQPError, match="no such input file"):
        scan_input(tmp_path / "missing.jsonl")


def test_template_fills_fields_and_reports_missing_ones(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"name": "Ada", "meta": {"born": 1815}}, {"name": "Bob"}])
    config = BatchConfig(template="Person: {name}; data: {meta}")
    rows = list(read_input(src, config))
    assert rows[0].request["prompt"] == 'Person: Ada; data: {"born": 1815}'
    assert rows[1].error == "input line 2: no field 'meta' (used by the template)"
    for bad in ["{name.upper}", "{0}", "{name!r}", "{name:>10}", "no fields", "{unclosed"]:
        with pytest.raises(llmqp.InvalidArgument, match="--template"):
            BatchConfig(template=bad)


def test_config_rejects_bad_shared_options():
    with pytest.raises(llmqp.InvalidArgument, match="at most one"):
        BatchConfig(regex="a", choice=["a"])
    with pytest.raises(llmqp.InvalidArgument, match="max_batch"):
        BatchConfig(max_batch=0)
    with pytest.raises(llmqp.InvalidArgument, match="temperature"):
        BatchConfig(temperature=-1.0).check()
    with pytest.raises(llmqp.InvalidArgument, match="max_tokens"):
        BatchConfig(max_tokens=0).check()
    BatchConfig(choice=["yes", "no"]).check()  # valid: no exception


# ------------------------------------------------------------------------------------------ output file
def test_output_resume_reads_done_ids_and_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputFile.open(out) as f:
        assert f.done == set()
        f.write(output_row(1, error="x"))
        f.write(output_row("a", error="y"))
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": 7, "text": "cut he')  # a write cut short (machine crash)
    with OutputFile.open(out) as f:
        assert f.done == {"1", '"a"'}
        assert out.read_bytes() == whole  # the torn tail is gone
        f.write(output_row(7, error="z"))
    assert [r["id"] for r in read_output(out)] == [1, "a", 7]
    assert read_output(out)[0] == {"id": 1, "text": "", "value": None, "valid": False, "finish_reason": "error",
                                   "error": "x"}
    # Complete JSON without its newline was cut too: the row is redone, not trusted.
    out.write_bytes(whole + b'{"id": 9}')
    assert OutputFile.open(out).done == {"1", '"a"'} and out.read_bytes() == whole
    # A damaged complete last line is cut as well; one followed by more lines is refused.
    out.write_bytes(whole + b'\x00\x00\x00\n')
    assert OutputFile.open(out).done == {"1", '"a"'} and out.read_bytes() == whole
    out.write_bytes(b'{"id": 1}\ngarbage\n{"id": 2}\n')
    with pytest.raises(llmqp.LLMQPError, match="line 2 is damaged"):
        OutputFile.open(out)


# ------------------------------------------------------------------------------------------ real model
ROWS = [
    {"id": "ada", "text": "Ada Lovelace, 36, mathematician from London."},
    {"id": "alan", "text": "Alan Turing was 41 years old and lived in Wilmslow."},
    {"id": "grace", "text": "Grace Hopper, age 85, computer scientist, New York."},
    {"id": "linus", "text": "Linus Torvalds (54) writes kernels in Portland."},
    {"id": "marie", "text": "Marie Curie, 66, physicist and chemist, Paris."},
    {"id": "edsger", "text": "Edsger Dijkstra, 72 years, Nuenen."},
]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}
TEMPLATE = "Extract the person's name and age as JSON: {text}"


@pytest.mark.slow
def test_run_batch_writes_every_row_once_with_error_rows(engine, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", ROWS[:2] + [
        "{broken",
        {"id": "bad-schema", "text": "x", "json_schema": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}},
        {"id": "bad-option", "text": "x", "choice": "not-a-list"},
        {"id": "own-choice", "text": "Is the sky blue?", "choice": ["yes", "no"]},
    ])
    out = tmp_path / "out.jsonl"
    config = BatchConfig(template=TEMPLATE, json_schema=SCHEMA, max_tokens=24, max_batch=4)
    summary = run_batch(engine, src, out, config, progress=False)
    rows = {r["id"]: r for r in read_output(out)}
    assert len(read_output(out)) == len(rows) == 6 and summary.done == 6 and summary.skipped == 0
    for rid in ("ada", "alan"):
        assert rows[rid]["finish_reason"] in ("stop", "length") and rows[rid]["error"] is None
        if rows[rid]["valid"]:
            assert rows[rid]["value"] == json.loads(rows[rid]["text"])
    assert rows[3]["error"].startswith("input line 3: invalid JSON")
    assert rows["bad-schema"]["finish_reason"] == "error" and "nosuchtype" in rows["bad-schema"]["error"]
    assert rows["bad-option"]["finish_reason"] == "error" and rows["bad-option"]["error"]
    assert rows["own-choice"]["text"] in ("yes", "no") and rows["own-choice"]["valid"] is True
    assert summary.errors == 3
    # Each row equals what generate() gives alone (greedy).
    alone = engine.generate(TEMPLATE.format(text=ROWS[0]["text"]), json_schema=SCHEMA, max_tokens=24)
    assert rows["ada"]["text"] == alone.text and rows["ada"]["valid"] == alone.valid
    # A re-run finds everything done and writes nothing.
    again = run_batch(engine, src, out, config, progress=False)
    assert again.done == 0 and again.skipped == 6 and len(read_output(out)) == 6


def batch_command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "llmqp.cli", "batch", str(src), "-o", str(out), "--template", TEMPLATE,
            "--json-schema", json.dumps(SCHEMA), "--max-tokens", "24", "--max-batch", "2", "--no-progress"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_each_row_once(engine, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", ROWS)
    reference = tmp_path / "reference.jsonl"
    run_batch(engine, src, reference, BatchConfig(template=TEMPLATE, json_schema=SCHEMA, max_tokens=24,
                                                  max_batch=2), progress=False)
    expected = {r["id"]: r for r in read_output(reference)}
    assert len(expected) == len(ROWS)

    out = tmp_path / "out.jsonl"
    child = subprocess.Popen(batch_command(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and len(read_output(out)) >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, f"the run ended before it could be killed: {child.communicate()[1][-2000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    written = read_output(out)
    assert 2 <= len(written) < len(ROWS)  # killed part-way

    resumed = subprocess.run(batch_command(src, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(written)} already in the output" in resumed.stderr
    final = read_output(out)
    assert sorted(r["id"] for r in final) == sorted(expected)  # every row exactly once
    assert {r["id"]: r for r in final} == expected             # and equal to an uninterrupted run
