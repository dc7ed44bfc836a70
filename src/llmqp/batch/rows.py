"""Input rows of `llmqp batch`: one JSON object per line -> one `llmqp.Request` (or the reason it has none).

A row holds the prompt (the field `BatchConfig.prompt_field`, "prompt" by default, or the fields a
`BatchConfig.template` names), an optional `id` (a string or an integer; default: the 1-based line number)
and optionally its own constraint: `json_schema`, `regex`, `choice` or `grammar`. A row's own constraint
replaces the one given for the whole run. Every other field is ignored unless the template uses it.

Error contract: `BatchConfig(...)` raises InvalidArgument for a bad template or option; `scan_input`
raises LLMQPError for what makes the whole file unusable (missing file, two rows with one id); a single
bad row never raises — it becomes an `InputRow` with `error` set, which the runner writes as an error line.
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Any, Iterator

from llmqp.errors import LLMQPError
from llmqp.sampling import InvalidArgument

CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "grammar")
# Request options a whole run shares (the options of `llmqp generate`), with their defaults.
GENERATION_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "raw", "strict", "whitespace",
                     "plan", "forced", "draft")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How rows become requests: one object serves `llmqp batch`, `run_batch` and `llmqp.ray.Extractor`.

    prompt_field: the row field holding the prompt (a string, a list of {"role", "content"} messages or a
    list of token ids). template: instead of a prompt field, a `str.format` template over the row's fields,
    e.g. "Extract the person from: {text}" (plain field names only; non-string values are inserted as JSON).
    json_schema / regex / choice / grammar: the constraint of every row that has none of its own.
    max_batch: requests decoded together (the scheduler's slots). The rest are `generate`'s options."""

    prompt_field: str = "prompt"
    template: str | None = None
    json_schema: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    raw: bool = False
    strict: bool = True
    whitespace: str = "compact"
    plan: str = "auto"
    forced: bool = True
    draft: str = "auto"
    max_batch: int = 8

    def __post_init__(self):
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))
        if sum(getattr(self, f) is not None for f in CONSTRAINT_FIELDS) > 1:
            raise InvalidArgument("give at most one of json_schema, regex, choice, grammar")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InvalidArgument(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.template is not None:
            self.template_fields()  # validates

    def check(self, engine=None) -> None:
        """Validate the shared options (InvalidArgument) and, given an engine, compile the shared constraint
        once (ConstraintError): a mistake there would otherwise fail every row, so it fails the run."""
        from llmqp import Request

        Request(prompt="-", **self.defaults()).validate()
        if engine is not None and self.constraint_kw() is not None:
            engine.constraint(**self.constraint_kw())

    def constraint_kw(self) -> dict | None:
        """The shared constraint as `Engine.constraint` keywords, or None when rows have none in common."""
        kinds = {f: getattr(self, f) for f in CONSTRAINT_FIELDS if getattr(self, f) is not None}
        if not kinds:
            return None
        kinds = {k: list(v) if k == "choice" else v for k, v in kinds.items()}
        return dict(kinds, strict=self.strict, whitespace=self.whitespace)

    def template_fields(self) -> list[str]:
        """The field names the template uses, in order. Raises InvalidArgument for a malformed template or
        a field that is not a plain name (attribute and index lookups are refused)."""
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise InvalidArgument(f"--template: {e}") from None
        names = []
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise InvalidArgument(f"--template: use plain field names like {{text}}, got {{{name}"
                                      f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}")
            names.append(name)
        if not names:
            raise InvalidArgument("--template names no field (write e.g. 'Summarize: {text}')")
        return names

    def defaults(self) -> dict:
        """The request options every row shares (constraint included), as `llmqp.Request` keywords."""
        out = {f: getattr(self, f) for f in GENERATION_FIELDS}
        out.update({f: getattr(self, f) for f in CONSTRAINT_FIELDS if getattr(self, f) is not None})
        if "choice" in out:
            out["choice"] = list(out["choice"])
        return out

    def request_for(self, row: dict) -> dict:
        """The request keywords (`llmqp.Request` fields) for one input row. Raises RowError naming what the
        row lacks; option values themselves are checked by the scheduler."""
        request = self.defaults()
        own = {f: row[f] for f in CONSTRAINT_FIELDS if row.get(f) is not None}
        if own:
            for f in CONSTRAINT_FIELDS:
                request.pop(f, None)
            request.update(own)
        if self.template is not None:
            missing = [n for n in self.template_fields() if n not in row]
            if missing:
                raise RowError(f"no field {', '.join(map(repr, missing))} (used by the template)")
            request["prompt"] = self.template.format_map(
                {n: row[n] if isinstance(row[n], str) else json.dumps(row[n], ensure_ascii=False)
                 for n in self.template_fields()})
        else:
            if self.prompt_field not in row:
                raise RowError(f"no {self.prompt_field!r} field (name the prompt's field with --prompt-field, "
                               f"or build it with --template)")
            request["prompt"] = row[self.prompt_field]
        return request


class RowError(LLMQPError):
    """One input row cannot become a request; the run writes an error line for it and goes on."""


@dataclasses.dataclass(frozen=True)
class InputRow:
    """One input row. line: its 1-based line number (None for rows that did not come from a file). id: the
    row's id (its `id` field, else `line`). request: `llmqp.Request` keywords, None when `error` says why
    the row has none."""

    line: int | None
    id: Any
    request: dict | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        """How messages name the row: "input line N", or "row <id>"."""
        return f"input line {self.line}" if self.line is not None else f"row {self.id!r}"


def id_key(row_id) -> str:
    """A canonical string for an id (1 and "1" differ), used to match input rows and output lines."""
    return json.dumps(row_id, ensure_ascii=False)


def parse_line(line_number: int, text: str) -> tuple[Any, dict | None, str | None]:
    """(id, row, error) of one non-blank input line; `row` is None when the line is unusable."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return line_number, None, f"input line {line_number}: invalid JSON: {e}"
    if not isinstance(row, dict):
        return line_number, None, f"input line {line_number}: expected a JSON object, got {type(row).__name__}"
    row_id = row.get("id", line_number)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return line_number, None, f"input line {line_number}: id must be a string or an integer, got {row_id!r}"
    return row_id, row, None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


def scan_input(path: str | Path) -> dict[str, int]:
    """{id_key: line number} of every non-blank line (malformed lines count under their line number).

    Reads the file once without keeping rows. Raises LLMQPError when the file cannot be read or two rows
    share an id (each row must be written exactly once)."""
    path = Path(path)
    if not path.is_file():
        raise LLMQPError(f"no such input file: {path}")
    seen: dict[str, int] = {}
    for number, text in _lines(path):
        row_id, _, _ = parse_line(number, text)
        key = id_key(row_id)
        if key in seen:
            raise LLMQPError(f"input line {number}: id {row_id!r} already used on line {seen[key]} "
                             f"(ids must be unique: the output has one line per id)")
        seen[key] = number
    return seen


def read_input(path: str | Path, config: BatchConfig, skip: set[str] = frozenset()) -> Iterator[InputRow]:
    """The rows of `path` in file order, minus those whose id_key is in `skip`. Streams the file."""
    for number, text in _lines(Path(path)):
        row_id, row, error = parse_line(number, text)
        if id_key(row_id) in skip:
            continue
        if error is not None:
            yield InputRow(number, row_id, error=error)
            continue
        try:
            yield InputRow(number, row_id, request=config.request_for(row))
        except RowError as e:
            yield InputRow(number, row_id, error=f"input line {number}: {e}")
