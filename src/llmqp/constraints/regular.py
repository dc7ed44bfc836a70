"""Regular-language operations on JSON-Schema patterns: complement and look-around removal, exactly.

llguidance's regexes (Rust `regex-syntax`) have no look-around, and JSON Schema has no "does not
match". Both are regular, so this module builds the language a pattern matches as a deterministic
automaton and writes it back as a look-around-free regex:

    complement(p)         -> the strings `p` does not find (anchored: `^(?:...)$`)
    finite_words(p)       -> the strings `p` finds, where they are few
    without_lookaround(p) -> the strings `p` finds, for `p` with `^(?!X)` / `^(?=X)` right after a
                             leading `^` (any number of them), a trailing `(?=X)`, or `^` / `$` in the
                             middle (each an assertion on the string's ends, as in ECMA-262 without
                             the m flag)

Patterns are read by the parser of Python's `re` (as `jsonschema` reads them), with search semantics
(a pattern need only match a substring). `.` is any character but `\\n`; `\\d`, `\\w`, `\\s` mean what
they mean to llguidance (Rust's Unicode classes), so characters outside ASCII are split by those
classes, never enumerated. Every function returns None (the caller refuses) for what it does not
handle: flags, back-references, look-behind, look-ahead elsewhere, or an automaton or regex past
MAX_STATES / MAX_REGEX_CHARS.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
import warnings
from typing import Any

MAX_STATES = 400  # states of a determinised automaton
MAX_REGEX_CHARS = 100_000  # length of a regex written back
_REPEAT_MAX = 300  # a counted repetition is unrolled up to this many copies
_TOP = 0x110000
_RUST_AMBIGUOUS = ("&&", "--", "~~", "[[")


class _No(Exception):
    """The pattern is outside what this module handles."""


def _parse(pattern: str):
    """The pattern as Python's `re` parses it (quietly: `[[` draws a FutureWarning about nested sets,
    which Python, like ECMA-262, does not read)."""
    import re._parser as sre

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return sre.parse(pattern)


@functools.lru_cache(maxsize=512)
def complement(pattern: str) -> str | None:
    """An anchored regex for the strings in which `pattern` finds no match, or None. Refused (None)
    where Rust's regex reads the pattern otherwise (class set operations `&&`/`--`/`~~`, nested `[[`):
    llguidance enforces the pattern itself with that reading elsewhere in the same schema."""
    if any(op in pattern for op in _RUST_AMBIGUOUS):
        return None
    try:
        lang = _Lang.of([pattern])
        dfa = lang.search_dfa(pattern)
        return lang.to_regex(dfa.complemented())
    except (_No, re.error, RecursionError, OverflowError):
        return None


MAX_ATOM_PATTERNS = 6  # pattern_atoms splits at most this many patterns (up to 2**n - 1 parts)


@functools.lru_cache(maxsize=128)
def pattern_atoms(patterns: tuple[str, ...]) -> tuple[tuple[frozenset, str], ...] | None:
    """The strings that some of `patterns` find, split by which ones find them: (the indices of the
    patterns that find a match, an anchored regex for exactly those strings), one per non-empty part,
    so the regexes are pairwise disjoint and together find what the patterns find. None where a pattern
    is outside this module, there are more than MAX_ATOM_PATTERNS, or an automaton grows too large."""
    if len(patterns) > MAX_ATOM_PATTERNS or any(op in p for p in patterns for op in _RUST_AMBIGUOUS):
        return None
    try:
        lang = _Lang.of(list(patterns))
        dfas = [lang.search_dfa(p) for p in patterns]
        out = []
        for mask in range(1, 1 << len(patterns)):
            part = None
            for i, dfa in enumerate(dfas):
                side = dfa if mask >> i & 1 else dfa.complemented()
                part = side if part is None else part.product(side)
                if part.start not in part.live_states():
                    break
            else:
                out.append((frozenset(i for i in range(len(patterns)) if mask >> i & 1), lang.to_regex(part)))
        return tuple(out)
    except (_No, re.error, RecursionError, OverflowError):
        return None


@functools.lru_cache(maxsize=512)
def without_lookaround(pattern: str) -> str | None:
    """An anchored look-around-free regex for the strings in which `pattern` finds a match, or None."""
    try:
        lang = _Lang.of([pattern])
        return lang.to_regex(lang.search_dfa(pattern))
    except (_No, re.error, RecursionError, OverflowError):
        return None


@functools.lru_cache(maxsize=512)
def finite_words(pattern: str, limit: int = 64) -> tuple[str, ...] | None:
    """The strings in which `pattern` finds a match, when they are at most `limit` (sorted), or None
    (more, infinitely many, or a pattern this module does not read)."""
    if any(op in pattern for op in _RUST_AMBIGUOUS):
        return None
    try:
        lang = _Lang.of([pattern])
        dfa = lang.search_dfa(pattern)
    except (_No, re.error, RecursionError, OverflowError):
        return None
    live = dfa.live_states()
    words: list[str] = []
    on_path: set[int] = set()

    def walk(q: int, prefix: str) -> bool:  # False: infinite, or past the limit
        if q in on_path:
            return False  # a cycle through live states: infinitely many strings
        on_path.add(q)
        if q in dfa.accepting:
            words.append(prefix)
        for sym in range(dfa.n_symbols):
            r = dfa.delta[(q, sym)]
            if r not in live:
                continue
            lo, hi, sig = lang.regions[sym]
            if sig is not None or len(words) + hi - lo + 1 > limit:
                return False
            if not all(walk(r, prefix + chr(c)) for c in range(lo, hi + 1)):
                return False
        on_path.discard(q)
        return len(words) <= limit

    if dfa.start not in live:
        return ()
    return tuple(sorted(words)) if walk(dfa.start, "") else None


def without_assertions(pattern) -> str | None:
    """`pattern` with every look-around group (`(?=X)`, `(?!X)`, `(?<=X)`, `(?<!X)`) left out: a pattern
    that finds at least the strings `pattern` finds (an assertion only narrows). None where there is none
    to leave out, or where the pattern is not read here."""
    if not isinstance(pattern, str) or "(?" not in pattern or any(op in pattern for op in _RUST_AMBIGUOUS):
        return None  # (Rust reads class set operations and nested classes otherwise)
    out, i, in_class, depth, skip, removed = [], 0, False, 0, None, False  # skip: the depth a left-out group closes at
    while i < len(pattern):
        c, step = pattern[i], 2 if pattern[i] == "\\" else 1
        if step == 2:
            pass
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            step += 1 if pattern.startswith("]", i + 1) else 2 if pattern.startswith("^]", i + 1) else 0
        elif c == "(":
            if skip is None and any(pattern.startswith(p, i) for p in ("(?=", "(?!", "(?<=", "(?<!")):
                skip, removed = depth, True
            depth += 1
        elif c == ")":
            depth -= 1
            if skip == depth:
                skip, i = None, i + 1
                continue
        if skip is None:
            out.append(pattern[i:i + step])
        i += step
    if skip is not None or not removed:
        return None
    wider = "".join(out)
    try:
        _parse(wider)
    except (re.error, RecursionError, OverflowError):
        return None
    return wider


@functools.lru_cache(maxsize=1024)
def has_backreference(pattern: Any) -> bool:
    """Does `pattern` (as Python reads it) use a back-reference (`\\1`, `(?P=name)`), which no regular
    language and no llguidance regex says?"""
    import re._parser as sre

    if not isinstance(pattern, str) or ("\\" not in pattern and "(?P=" not in pattern):
        return False
    try:
        stack = [list(_parse(pattern))]
    except (re.error, RecursionError, OverflowError):
        return False
    while stack:
        for op, arg in stack.pop():
            if op in (sre.GROUPREF, sre.GROUPREF_EXISTS):
                return True
            if op is sre.SUBPATTERN:
                stack.append(list(arg[3]))
            elif op is sre.BRANCH:
                stack.extend(list(b) for b in arg[1])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                stack.append(list(arg[2]))
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                stack.append(list(arg[1]))
    return False


def needs_rewrite(pattern: str) -> bool:
    """Does `pattern` use something llguidance rejects that `without_lookaround` may remove (a
    look-ahead, or a `^`/`$` that is not at the very start/end of the pattern)?"""
    if not isinstance(pattern, str) or ("(?" not in pattern and "$" not in pattern[:-1] and "^" not in pattern[1:]):
        return False
    return _needs_rewrite(pattern)


@functools.lru_cache(maxsize=4096)
def _needs_rewrite(pattern: str) -> bool:
    import re._parser as sre

    try:
        tokens = list(_parse(pattern))
    except (re.error, RecursionError, OverflowError):
        return False  # llguidance reports it
    stack = [(tokens, True, True)]  # (sequence, it starts the pattern, it ends the pattern)
    while stack:
        items, head, tail = stack.pop()
        for i, (op, arg) in enumerate(items):
            first, last = head and i == 0, tail and i == len(items) - 1
            if op in (sre.ASSERT, sre.ASSERT_NOT):
                return True
            if op is sre.AT and not ((arg is sre.AT_BEGINNING and first) or (arg is sre.AT_END and last)):
                return True  # llguidance takes `^` / `$` only where nothing can come before / after
            if op is sre.SUBPATTERN:
                stack.append((list(arg[3]), first, last))
            elif op is sre.BRANCH:
                stack.extend((list(b), first, last) for b in arg[1])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                stack.append((list(arg[2]), False, False))
    return False


# --------------------------------------------------------------------------------------- alphabet
# Characters are grouped into regions: an interval of code points, and, outside ASCII when a class
# like \d is used, which of "d" (a \d), "w" (a \w, not \d), "s" (a \s) or "o" (none) they are.
_ASCII_CATS = {"d": lambda c: "0" <= c <= "9", "w": lambda c: c.isascii() and (c.isalnum() or c == "_"),
               "s": lambda c: c in " \t\n\x0b\x0c\r"}
_SIGS = ("d", "w", "s", "o")
_SIG_CLASS = {"d": "\\d", "w": "\\w&&\\D", "s": "\\s", "o": "\\W&&\\S"}  # Rust class-set syntax
_CATEGORY = {"CATEGORY_DIGIT": ("d", False), "CATEGORY_NOT_DIGIT": ("d", True), "CATEGORY_WORD": ("w", False),
             "CATEGORY_NOT_WORD": ("w", True), "CATEGORY_SPACE": ("s", False), "CATEGORY_NOT_SPACE": ("s", True)}


def _in_category(cat: str, region: tuple) -> bool:
    lo, hi, sig = region
    if sig is None:
        c = chr(lo)
        return _ASCII_CATS["w"](c) if cat == "w" else _ASCII_CATS[cat](c)
    return sig in (("d", "w") if cat == "w" else (cat,))


class _Lang:
    """The alphabet (regions) shared by the automata of some patterns, and their construction."""

    def __init__(self, regions: list[tuple]):
        self.regions = regions  # (lo, hi, sig or None)
        self.all = frozenset(range(len(regions)))

    @classmethod
    def of(cls, patterns: list[str]) -> "_Lang":
        import re._parser as sre

        points, uses_categories = {0, _TOP, 0x0A, 0x0B}, False
        for p in patterns:
            stack = [list(_parse(p))]
            while stack:
                for op, arg in stack.pop():
                    if op is sre.LITERAL or op is sre.NOT_LITERAL:
                        points.update((arg, arg + 1))
                    elif op is sre.RANGE:
                        points.update((arg[0], arg[1] + 1))
                    elif op is sre.CATEGORY:
                        uses_categories = True
                    elif op is sre.IN:
                        stack.append(list(arg))
                    elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                        stack.append(list(arg[2]))
                    elif op is sre.SUBPATTERN:
                        stack.append(list(arg[3]))
                    elif op is sre.BRANCH:
                        stack.extend(list(b) for b in arg[1])
                    elif op in (sre.ASSERT, sre.ASSERT_NOT):
                        stack.append(list(arg[1]))
        if uses_categories:
            points.update(range(0, 0x81))  # ASCII characters one by one: each is in a class or not
        cuts = sorted(points)
        regions = []
        for lo, nxt in zip(cuts, cuts[1:]):
            if uses_categories and lo >= 0x80:
                regions.extend((lo, nxt - 1, sig) for sig in _SIGS)
            else:
                regions.append((lo, nxt - 1, None))
        if len(regions) > 2000:
            raise _No("too many character regions")
        return cls(regions)

    # ------------------------------------------------------------------------------ character sets
    def charset(self, op, arg, sre) -> frozenset:
        if op is sre.LITERAL:
            return frozenset(i for i, r in enumerate(self.regions) if r[0] <= arg <= r[1])
        if op is sre.NOT_LITERAL:
            return self.all - self.charset(sre.LITERAL, arg, sre)
        if op is sre.ANY:
            return self.all - self.charset(sre.LITERAL, 0x0A, sre)
        if op is sre.CATEGORY:
            cat, negated = _CATEGORY.get(str(arg), (None, None))
            if cat is None:
                raise _No(f"category {arg}")
            inside = frozenset(i for i, r in enumerate(self.regions) if _in_category(cat, r))
            return self.all - inside if negated else inside
        if op is sre.IN:
            items, negated = list(arg), False
            if items and items[0][0] is sre.NEGATE:
                items, negated = items[1:], True
            out: frozenset = frozenset()
            for kind, value in items:
                if kind is sre.RANGE:
                    out |= frozenset(i for i, r in enumerate(self.regions) if value[0] <= r[0] and r[1] <= value[1])
                else:
                    out |= self.charset(kind, value, sre)
            return self.all - out if negated else out
        raise _No(f"class {op}")

    # ------------------------------------------------------------------------------------- automata
    def search_dfa(self, pattern: str) -> "_DFA":
        """The strings in which `pattern` finds a match."""
        import re._parser as sre

        parsed = _parse(pattern)
        if parsed.state.flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE):
            raise _No("flags")
        tokens = list(parsed)
        anchored = bool(tokens) and tokens[0] == (sre.AT, sre.AT_BEGINNING)
        looks = []
        i = int(anchored)
        while anchored and i < len(tokens) and tokens[i][0] in (sre.ASSERT, sre.ASSERT_NOT) and tokens[i][1][0] == 1:
            looks.append((tokens[i][0] is sre.ASSERT_NOT, [(sre.AT, sre.AT_BEGINNING)] + list(tokens[i][1][1])))
            i += 1
        rest = tokens[:int(anchored)] + tokens[i:]
        if rest and rest[-1][0] is sre.ASSERT and rest[-1][1][0] == 1:  # Y(?=X) finds what YX finds
            rest = rest[:-1] + list(rest[-1][1][1])
        dfa = self._search(rest, sre)
        for negated, look in looks:
            other = self._search(look, sre)
            dfa = dfa.product(other.complemented() if negated else other)
        return dfa.minimized()

    def _search(self, tokens: list, sre) -> "_DFA":
        nfa = _NFA()
        start, end = nfa.new(), nfa.new()
        nfa.edge(start, start, self.all)  # any prefix
        nfa.edge(end, end, self.all)  # any suffix
        self._build(nfa, tokens, start, end, sre)
        return _DFA.determinise(nfa, start, end, len(self.regions))

    def _build(self, nfa: "_NFA", tokens: list, a: int, b: int, sre) -> None:
        """Add paths a -> b for the sequence `tokens`."""
        cur = a
        for n, (op, arg) in enumerate(tokens):
            nxt = b if n == len(tokens) - 1 else nfa.new()
            self._item(nfa, op, arg, cur, nxt, sre)
            cur = nxt
        if not tokens:
            nfa.eps(a, b)

    def _item(self, nfa: "_NFA", op, arg, a: int, b: int, sre) -> None:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN, sre.CATEGORY):
            nfa.edge(a, b, self.charset(op, arg, sre))
        elif op is sre.AT:
            if arg in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
                nfa.cond(a, b, "^")
            elif arg in (sre.AT_END, sre.AT_END_STRING):
                nfa.cond(a, b, "$")
            else:
                raise _No(f"assertion {arg}")
        elif op is sre.SUBPATTERN:
            group, add_flags, del_flags, body = arg
            if add_flags or del_flags:
                raise _No("flags")
            self._build(nfa, list(body), a, b, sre)
        elif op is sre.BRANCH:
            for branch in arg[1]:
                self._build(nfa, list(branch), a, b, sre)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, body = arg
            if op is sre.POSSESSIVE_REPEAT:
                raise _No("possessive repetition")
            unbounded = high == sre.MAXREPEAT
            if low > _REPEAT_MAX or (not unbounded and high > _REPEAT_MAX):
                raise _No("repetition count")
            cur = a
            for _ in range(low):
                nxt = nfa.new()
                self._build(nfa, list(body), cur, nxt, sre)
                cur = nxt
            if unbounded:
                loop = nfa.new()
                nfa.eps(cur, loop)
                inner = nfa.new()
                self._build(nfa, list(body), loop, inner, sre)
                nfa.eps(inner, loop)
                nfa.eps(loop, b)
            else:
                for _ in range(high - low):
                    nfa.eps(cur, b)
                    nxt = nfa.new()
                    self._build(nfa, list(body), cur, nxt, sre)
                    cur = nxt
                nfa.eps(cur, b)
        else:
            raise _No(f"operator {op}")
        if nfa.size > 20_000:
            raise _No("pattern too large")

    # ------------------------------------------------------------------------------------ writing
    def to_regex(self, dfa: "_DFA") -> str:
        """An anchored regex (Rust syntax) for the strings `dfa` accepts."""
        dfa = dfa.minimized()
        live = dfa.live_states()
        if dfa.start not in live:
            return "^[^\\x{0}-\\x{10ffff}]$"  # nothing
        # Generalised automaton: labels are ("set", frozenset) or ("re", str); S and F are extra states.
        edges: dict[tuple, object] = {}
        for (q, sym), r in dfa.delta.items():
            if q in live and r in live:
                key = (q, r)
                edges[key] = (edges.get(key) or frozenset()) | {sym}
        labels: dict[tuple, str] = {k: self._cls(v) for k, v in edges.items()}
        labels[("S", dfa.start)] = ""
        for q in live:
            if q in dfa.accepting:
                labels[(q, "F")] = ""
        states = set(live)
        while states:
            def cost(q):
                ins = sum(1 for (x, y) in labels if y == q and x != q)
                outs = sum(1 for (x, y) in labels if x == q and y != q)
                return ins * outs
            q = min(states, key=cost)
            loop = labels.get((q, q))
            loop_re = f"{_group(loop)}*" if loop else ""
            ins = [(x, lab) for (x, y), lab in labels.items() if y == q and x != q]
            outs = [(y, lab) for (x, y), lab in labels.items() if x == q and y != q]
            for x, lin in ins:
                for y, lout in outs:
                    path = _seq(lin, loop_re, lout)
                    old = labels.get((x, y))
                    labels[(x, y)] = path if old is None else _alt(old, path)
            for key in [k for k in labels if q in k]:
                del labels[key]
            states.discard(q)
            if sum(len(v) for v in labels.values()) > MAX_REGEX_CHARS:
                raise _No("regex too long")
        body = labels.get(("S", "F"))
        if body is None:
            return "^[^\\x{0}-\\x{10ffff}]$"
        return f"^(?:{body})$"

    def _cls(self, symbols: frozenset) -> str:
        if symbols == self.all:
            return "[\\x{0}-\\x{10ffff}]"
        plain: list[tuple[int, int]] = []
        by_sig: dict[tuple[int, int], set] = {}
        for i in sorted(symbols):
            lo, hi, sig = self.regions[i]
            if sig is None:
                plain.append((lo, hi))
            else:
                by_sig.setdefault((lo, hi), set()).add(sig)
        nested = []
        for span, sigs in by_sig.items():
            if len(sigs) == len(_SIGS):
                plain.append(span)
            else:
                nested.append((span, sigs))
        merged: list[list[int]] = []
        for lo, hi in sorted(plain):
            if merged and merged[-1][1] + 1 >= lo:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        parts = ["\\x{%x}" % lo if lo == hi else "\\x{%x}-\\x{%x}" % (lo, hi) for lo, hi in merged]
        groups: dict[frozenset, list] = {}
        for span, sigs in nested:
            groups.setdefault(frozenset(sigs), []).append(span)
        for sigs, spans in groups.items():
            ranges = "".join("\\x{%x}-\\x{%x}" % span for span in spans)
            parts.extend(f"[[{ranges}]&&{_SIG_CLASS[sig]}]" for sig in sorted(sigs))
        if len(parts) == 1 and not parts[0].startswith("["):
            return parts[0] if "-" not in parts[0] else f"[{parts[0]}]"
        return "[" + "".join(parts) + "]"


def _group(regex: str) -> str:
    if len(regex) <= 1 or (regex.startswith("[") and _closes_at_end(regex)) or \
            (regex.startswith("\\x{") and regex.count("\\x{") == 1 and regex.endswith("}")):
        return regex
    return f"(?:{regex})"


def _closes_at_end(regex: str) -> bool:
    """Is `regex` one bracketed class (the `[` at 0 closes at the end)?"""
    depth, i = 0, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0 and i != len(regex) - 1:
                return False
        i += 1
    return True


def _seq(*parts: str) -> str:
    return "".join(_group(p) if "|" in p and not p.startswith("(?:") else p for p in parts if p)


def _alt(a: str, b: str) -> str:
    if a == b:
        return a
    if a == "":
        return f"(?:{b})?" if b else ""
    if b == "":
        return f"(?:{a})?"
    return f"(?:{a}|{b})"


# -------------------------------------------------------------------------------------- automata
class _NFA:
    def __init__(self):
        self.size = 0
        self.edges: list[list[tuple]] = []  # per state: (kind, label, target); kind "c" chars, "e" eps, "^", "$"

    def new(self) -> int:
        self.edges.append([])
        self.size += 1
        return self.size - 1

    def edge(self, a: int, b: int, symbols: frozenset) -> None:
        if symbols:
            self.edges[a].append(("c", symbols, b))

    def eps(self, a: int, b: int) -> None:
        self.edges[a].append(("e", None, b))

    def cond(self, a: int, b: int, kind: str) -> None:
        self.edges[a].append((kind, None, b))

    def closure(self, states, allow: set) -> frozenset:
        out, stack = set(states), list(states)
        while stack:
            q = stack.pop()
            for kind, _, r in self.edges[q]:
                if (kind == "e" or kind in allow) and r not in out:
                    out.add(r)
                    stack.append(r)
        return frozenset(out)


class _DFA:
    def __init__(self, n_symbols: int):
        self.n_symbols = n_symbols
        self.start = 0
        self.accepting: set[int] = set()
        self.delta: dict[tuple[int, int], int] = {}  # complete: every (state, symbol)
        self.count = 0

    @classmethod
    def determinise(cls, nfa: _NFA, start: int, final: int, n_symbols: int) -> "_DFA":
        dfa = cls(n_symbols)
        first = nfa.closure([start], {"^"})
        ids = {(first, True): 0}
        todo = [(first, True)]
        dfa.count = 1
        while todo:
            key = todo.pop()
            states, at_start = key
            q = ids[key]
            if final in nfa.closure(states, {"$", "^"} if at_start else {"$"}):
                dfa.accepting.add(q)
            moves: dict[int, set] = {}
            for s in states:
                for kind, label, r in nfa.edges[s]:
                    if kind == "c":
                        for sym in label:
                            moves.setdefault(sym, set()).add(r)
            for sym in range(n_symbols):
                target = (nfa.closure(moves.get(sym, ()), set()), False)
                if target not in ids:
                    ids[target] = dfa.count
                    dfa.count += 1
                    if dfa.count > MAX_STATES * 4:
                        raise _No("automaton too large")
                    todo.append(target)
                dfa.delta[(q, sym)] = ids[target]
        return dfa.minimized()

    def complemented(self) -> "_DFA":
        out = _DFA(self.n_symbols)
        out.start, out.count, out.delta = self.start, self.count, dict(self.delta)
        out.accepting = set(range(self.count)) - self.accepting
        return out

    def product(self, other: "_DFA") -> "_DFA":
        """The intersection."""
        out = _DFA(self.n_symbols)
        ids = {(self.start, other.start): 0}
        todo = [(self.start, other.start)]
        out.count = 1
        while todo:
            pair = todo.pop()
            q = ids[pair]
            if pair[0] in self.accepting and pair[1] in other.accepting:
                out.accepting.add(q)
            for sym in range(self.n_symbols):
                nxt = (self.delta[(pair[0], sym)], other.delta[(pair[1], sym)])
                if nxt not in ids:
                    ids[nxt] = out.count
                    out.count += 1
                    if out.count > MAX_STATES * 4:
                        raise _No("automaton too large")
                    todo.append(nxt)
                out.delta[(q, sym)] = ids[nxt]
        return out.minimized()

    def minimized(self) -> "_DFA":
        """Moore's partition refinement over the reachable states."""
        reach, stack = {self.start}, [self.start]
        while stack:
            q = stack.pop()
            for sym in range(self.n_symbols):
                r = self.delta[(q, sym)]
                if r not in reach:
                    reach.add(r)
                    stack.append(r)
        states = sorted(reach)
        block = {q: int(q in self.accepting) for q in states}
        while True:
            sigs = {q: (block[q], tuple(block[self.delta[(q, s)]] for s in range(self.n_symbols))) for q in states}
            numbering: dict = {}
            new = {q: numbering.setdefault(sigs[q], len(numbering)) for q in states}
            if len(numbering) == len(set(block.values())):
                break
            block = new
        out = _DFA(self.n_symbols)
        out.count = len(set(block.values()))
        if out.count > MAX_STATES:
            raise _No("automaton too large")
        out.start = block[self.start]
        out.accepting = {block[q] for q in states if q in self.accepting}
        for q in states:
            for s in range(self.n_symbols):
                out.delta[(block[q], s)] = block[self.delta[(q, s)]]
        return out

    def live_states(self) -> set[int]:
        """States from which an accepting state can be reached."""
        back: dict[int, set] = {}
        for (q, _), r in self.delta.items():
            back.setdefault(r, set()).add(q)
        live, stack = set(self.accepting), list(self.accepting)
        while stack:
            r = stack.pop()
            for q in back.get(r, ()):
                if q not in live:
                    live.add(q)
                    stack.append(q)
        return live


# ------------------------------------------------------------------------------------ completions
_COUNT_CAP = 1 << 40  # counts are exact below this
_HORIZON = 48  # without maxLength, completions up to this many characters past minLength are counted


class Completions:
    """How many strings in the language of a pattern (search semantics, as `jsonschema` reads it) start
    with a given prefix, within length bounds: the uniqueItems layer keeps an item in progress only while
    it has a completion that no earlier item took.

    Counts are lower bounds, exact for ASCII: a region of non-ASCII characters that only a class like
    `\\w` names counts as none (its size under Rust's Unicode tables is not computed here), and without
    a maximum length only completions up to _HORIZON characters longer than the minimum are counted.
    A lower bound is the safe side: the layer may drop a continuation that still had an unused
    completion, never keep one that has none."""

    def __init__(self, pattern: str):
        lang = _Lang.of([pattern])
        dfa = lang.search_dfa(pattern)
        self._regions = lang.regions
        self._lows = [r[0] for r in lang.regions]
        self._dfa = dfa
        live = dfa.live_states()
        self._live = live
        self._edges: dict[int, list[tuple[int, int]]] = {}  # state -> [(target, characters)], live targets
        for q in range(dfa.count):
            weights: dict[int, int] = {}
            for sym in range(dfa.n_symbols):
                r = dfa.delta[(q, sym)]
                lo, hi, sig = lang.regions[sym]
                if r in live and sig is None:
                    weights[r] = weights.get(r, 0) + hi - lo + 1
            self._edges[q] = list(weights.items())
        self._memo: dict[tuple, int] = {}

    @classmethod
    @functools.lru_cache(maxsize=256)
    def of(cls, pattern: str) -> "Completions | None":
        """The counter for `pattern`, or None where this module does not handle the pattern."""
        if any(op in pattern for op in _RUST_AMBIGUOUS):
            return None
        try:
            return cls(pattern)
        except (_No, re.error, RecursionError, OverflowError):
            return None

    def _symbol(self, c: str) -> int:
        code = ord(c)
        i = bisect.bisect_right(self._lows, code) - 1
        sig = self._regions[i][2]
        if sig is None:
            return i
        cat = unicodedata.category(c)
        sig = "d" if cat == "Nd" else "w" if (c.isalnum() or cat in ("Mn", "Mc", "Me", "Pc")) else \
            "s" if c.isspace() else "o"
        first = bisect.bisect_left(self._lows, self._regions[i][0])
        return first + _SIGS.index(sig)

    def state(self, text: str) -> int | None:
        """The automaton's state after `text`, or None when no string of the language starts with it."""
        q = self._dfa.start
        for c in text:
            q = self._dfa.delta[(q, self._symbol(c))]
        return q if q in self._live else None

    def count(self, text: str, min_length: int = 0, max_length: int | None = None) -> int:
        """A lower bound (exact for ASCII, capped at 2**40) on the number of strings of the language
        that start with `text` and have between `min_length` and `max_length` characters."""
        q = self.state(text)
        if q is None:
            return 0
        lo = max(0, min_length - len(text))
        hi = (lo + _HORIZON) if max_length is None else max_length - len(text)
        if hi < lo:
            return 0
        key = (q, lo, hi)
        if key not in self._memo:
            self._memo[key] = self._count(q, lo, hi)
        return self._memo[key]

    def _count(self, q: int, lo: int, hi: int) -> int:
        accepting = self._dfa.accepting
        vec, total = {q: 1}, 0
        for length in range(hi + 1):
            if length >= lo:
                total += sum(n for r, n in vec.items() if r in accepting)
                if total >= _COUNT_CAP:
                    return _COUNT_CAP
            if length == hi:
                break
            nxt: dict[int, int] = {}
            for r, n in vec.items():
                for t, w in self._edges[r]:
                    nxt[t] = min(_COUNT_CAP, nxt.get(t, 0) + n * w)
            if not nxt:
                break
            vec = nxt
        return min(total, _COUNT_CAP)
