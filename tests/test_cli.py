"""The `llmqp` command line: inline JSON / grammar arguments, and one `llmqp: error:` line (exit 2) for
every user mistake — never a traceback. Generation runs on a tiny GGUF written by the test (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmqp.cli import _read_grammar, _read_json_schema, main
from tiny_gguf import write_tiny_gguf

LONG_DESCRIPTION = "a field description that makes the schema long " * 120  # ~5,800 characters


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLMQP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cli-cache"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmqp: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_long_inline_json_schema_generates(tiny_model, capsys):
    schema = {"type": "object", "description": LONG_DESCRIPTION,
              "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    text = json.dumps(schema)
    assert len(text) > 4096  # longer than any path the file system accepts (ENAMETOOLONG before)
    rc = main(["generate", "digits", "--raw", "--model", tiny_model, "--json-schema", text, "--max-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith('{"n":')  # the constraint was applied: the schema was parsed, not opened


def test_inline_json_forms_are_parsed_without_touching_the_file_system():
    assert _read_json_schema("  " + json.dumps({"description": LONG_DESCRIPTION})) == {"description": LONG_DESCRIPTION}
    assert _read_json_schema('[{"type": "integer"}]') == [{"type": "integer"}]
    assert _read_json_schema("true") is True and _read_json_schema(" false ") is False


def test_schema_file_is_read(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"type": "integer"}')
    assert _read_json_schema(str(path)) == {"type": "integer"}


@pytest.mark.parametrize("argument, message", [
    ('{"type": "object", "description": "' + LONG_DESCRIPTION + '"', "--json-schema (inline): invalid JSON"),
    ("x" * 5000, "--json-schema: neither inline JSON"),  # not JSON, and too long to be a path
    ("does/not/exist.json", "--json-schema: neither inline JSON"),
])
def test_bad_json_schema_argument_is_one_error_line(argument, message, capsys):
    assert main(["generate", "hi", "--json-schema", argument]) == 2
    assert message in _one_error_line(capsys)


def test_unreadable_schema_file_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"description": "caf\xe9"}')  # not UTF-8
    assert main(["generate", "hi", "--json-schema", str(path)]) == 2
    assert f"--json-schema: cannot read {path}" in _one_error_line(capsys)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["generate", "hi", "--json-schema", str(bad)]) == 2
    assert f"--json-schema file {bad}: invalid JSON" in _one_error_line(capsys)


def test_os_error_from_a_user_path_is_one_error_line(capsys):
    # A model path longer than the file system allows raises OSError (ENAMETOOLONG) inside the loader.
    assert main(["info", "--model", "m" * 5000 + ".gguf"]) == 2
    assert "File name too long" in _one_error_line(capsys)


def test_inline_grammar(tiny_model, tmp_path, capsys):
    grammar = 'start: "yes" | "no"'
    assert _read_grammar(grammar) == grammar
    assert _read_grammar("// a comment\nstart: ANSWER\nANSWER: \"yes\"") .startswith("// a comment")
    assert _read_grammar('root ::= "yes" | "no"') == 'root ::= "yes" | "no"'  # GBNF
    path = tmp_path / "g.lark"
    path.write_text(grammar)
    assert _read_grammar(str(path)) == grammar
    rc = main(["generate", "answer", "--raw", "--model", tiny_model, "--grammar", grammar, "--max-tokens", "4"])
    assert rc == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")


def test_missing_grammar_file_is_one_error_line(capsys):
    assert main(["generate", "hi", "--grammar", "examples/nope.lark"]) == 2
    assert "--grammar: no such file: examples/nope.lark" in _one_error_line(capsys)


def test_command_line_prints_no_traceback():
    # The installed entry point, in a fresh process: one line on stderr, exit status 2.
    argument = '{"type": "object", "description": "' + LONG_DESCRIPTION  # unterminated
    proc = subprocess.run([sys.executable, "-m", "llmqp.cli", "generate", "hi", "--json-schema", argument],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("llmqp: error: --json-schema (inline)")


def test_stop_option_ends_the_text_before_the_stop_string(tiny_model, capsys):
    args = ["generate", "abc abc", "--raw", "--model", tiny_model, "--max-tokens", "24", "--temperature", "1",
            "--seed", "3"]
    assert main(args) == 0
    full = capsys.readouterr().out[:-1]  # the CLI ends with one newline
    assert len(full) > 4
    stop = full[2:4]
    assert main(args + ["--stop", stop]) == 0
    assert capsys.readouterr().out[:-1] == full[: full.index(stop)]
