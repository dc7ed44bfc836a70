"""String `format`s as regular expressions: exactly the strings `jsonschema`'s FormatChecker accepts (with
its format extras: rfc3339-validator, rfc3987, jsonpointer, fqdn), or a documented subset of them.

llguidance knows some formats itself; for others, and where its regex accepts strings the checker
rejects, the keyword rewrite (`keywords.py`) replaces `format: X` by `pattern: PATTERNS[X]` (anchored; the
grammar intersects it with any other `pattern`), so the grammar enforces the format token by token.

    format                  how                         vs jsonschema's checker
    date                    PATTERNS (leap years)       equal (ASCII digits; year 0000 rejected)
    date-time, time         PATTERNS                    equal but for a trailing newline the checker's
                                                        `$` lets through; no leap second (neither has it)
    hostname                llguidance + maxLength 253  a subset: no trailing dot
    email                   llguidance (RFC 5321)       a subset: the checker only asks for an `@`
    ipv4, ipv6, uuid, uri,  llguidance                  subsets (no IPv6 zone or embedded IPv4)
    duration
    idn-email               PATTERNS: contains `@`      equal
    uri-reference, iri,     PATTERNS (RFC 3986 / 3987   subsets: dec-octets of an embedded IPv4 have no
    iri-reference           ABNF)                       leading zeros
    json-pointer            PATTERNS (RFC 6901)         equal
    relative-json-pointer   PATTERNS                    equal (as the checker reads the prefix: no digit
                                                        after a 0)

OpenAPI's string formats (OpenAPI 3.0, section 4.4):
    byte                    PATTERNS: RFC 4648 base64   equal to Python's base64.b64decode(s, validate=True)
                            (padded)                    (jsonschema knows no `byte`: it accepts any string)
    binary, password        PATTERNS: any string        equal (OpenAPI: any octets / a hint to obscure input)
Draft 3's names of two formats above: `host-name` (hostname) and `ip-address` (ipv4), in any draft.
OpenAPI's numeric formats (int32, int64, float, double) sit on numbers, where every format is an annotation
(below); on a schema that admits strings they are refused as unknown.

`regex` (not a regular language), `idn-hostname` (IDNA 2008 tables) and `uri-template` have no regular
form here: a string-only schema using them is checked whole by the token-level layer
(`llmqp.constraints.contains`, with `jsonschema`'s checker) where its place is known, and refused
elsewhere. Non-standard names (`url`, `path`, `int32` on a string, ...) are refused with ConstraintError by
default; `unknown_formats="annotation"` treats them as annotations, as JSON Schema 2019-09+ and
`jsonschema` do (they constrain nothing).
"""

from __future__ import annotations

from llmqp.constraints.base import UnknownFormats

__all__ = ["NATIVE", "PATTERNS", "UnknownFormats", "is_known", "is_standard", "pattern"]


# Formats llguidance enforces itself, with a regex that accepts only strings the checker accepts.
NATIVE = frozenset({"email", "hostname", "ipv4", "ipv6", "uuid", "uri", "duration"})
# Standard formats (JSON Schema 2020-12 and earlier drafts) with no exact regular form here: refused
# whatever the option says (a user who wrote them meant them).
STANDARD_REFUSED = frozenset({"regex", "idn-hostname", "uri-template"})  # draft 3's other names (color,
#                                                                          phone, ...) count as non-standard
ALIASES = {"host-name": "hostname", "ip-address": "ipv4"}  # draft 3's names
EXTRA_KEYWORDS = {"hostname": {"maxLength": 253}}  # fqdn's total-length rule beside llguidance's regex

# --------------------------------------------------------------------------------------- date / time
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"

# ------------------------------------------------------------------------------- URIs (RFC 3986/3987)
_HEX = "[0-9A-Fa-f]"
_H16 = f"{_HEX}{{1,4}}"
_DEC_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"(?:{_DEC_OCTET}\\.){{3}}{_DEC_OCTET}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "(?:" + "|".join([
    f"(?:{_H16}:){{6}}{_LS32}",
    f"::(?:{_H16}:){{5}}{_LS32}",
    f"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    f"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
    f"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
    f"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
    f"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
    f"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
    f"(?:(?:{_H16}:){{0,6}}{_H16})?::",
]) + ")"
_SUB_DELIMS = "!$&'()*+,;="
_UCS = ("\\x{A0}-\\x{D7FF}\\x{F900}-\\x{FDCF}\\x{FDF0}-\\x{FFEF}\\x{10000}-\\x{1FFFD}\\x{20000}-\\x{2FFFD}"
        "\\x{30000}-\\x{3FFFD}\\x{40000}-\\x{4FFFD}\\x{50000}-\\x{5FFFD}\\x{60000}-\\x{6FFFD}\\x{70000}-\\x{7FFFD}"
        "\\x{80000}-\\x{8FFFD}\\x{90000}-\\x{9FFFD}\\x{A0000}-\\x{AFFFD}\\x{B0000}-\\x{BFFFD}\\x{C0000}-\\x{CFFFD}"
        "\\x{D0000}-\\x{DFFFD}\\x{E1000}-\\x{EFFFD}")
_PRIVATE = "\\x{E000}-\\x{F8FF}\\x{F0000}-\\x{FFFFD}\\x{100000}-\\x{10FFFD}"


def _uri_reference(iri: bool, relative: bool, absolute: bool) -> str:
    """RFC 3986 `URI-reference` (`relative` and `absolute`), `URI` (`absolute` only) or `relative-ref`;
    with `iri`, RFC 3987's I-forms (ucschar in names and paths, iprivate in queries)."""
    ucs = _UCS if iri else ""
    pct = f"%{_HEX}{{2}}"
    pchar = f"(?:[A-Za-z0-9\\-._~{ucs}{_SUB_DELIMS}:@]|{pct})"
    userinfo = f"(?:[A-Za-z0-9\\-._~{ucs}{_SUB_DELIMS}:]|{pct})*"
    reg_name = f"(?:[A-Za-z0-9\\-._~{ucs}{_SUB_DELIMS}]|{pct})*"
    ip_literal = f"\\[(?:{_IPV6}|v{_HEX}+\\.[A-Za-z0-9\\-._~{_SUB_DELIMS}:]+)\\]"
    authority = f"(?:{userinfo}@)?(?:{ip_literal}|{_IPV4}|{reg_name})(?::[0-9]*)?"
    segment = f"{pchar}*"
    segment_nz = f"{pchar}+"
    segment_nz_nc = f"(?:[A-Za-z0-9\\-._~{ucs}{_SUB_DELIMS}@]|{pct})+"
    path_abempty = f"(?:/{segment})*"
    path_absolute = f"/(?:{segment_nz}(?:/{segment})*)?"
    query_chars = f"(?:{pchar}|[/?{_PRIVATE if iri else ''}])*"
    fragment = f"(?:{pchar}|[/?])*"
    tail = f"(?:\\?{query_chars})?(?:#{fragment})?"
    scheme = "[A-Za-z][A-Za-z0-9+\\-.]*"
    hier = f"(?://{authority}{path_abempty}|{path_absolute}|{segment_nz}(?:/{segment})*|)"
    rel = f"(?://{authority}{path_abempty}|{path_absolute}|{segment_nz_nc}(?:/{segment})*|)"
    forms = ([f"{scheme}:{hier}{tail}"] if absolute else []) + ([f"{rel}{tail}"] if relative else [])
    return "(?:" + "|".join(forms) + ")"


_JSON_POINTER = "(?:/(?:[^/~]|~[01])*)*"

PATTERNS = {
    "date": _DATE,
    "date-time": f"{_DATE}[Tt]{_TIME}",
    "time": _TIME,
    "idn-email": "[\\s\\S]*@[\\s\\S]*",
    "uri-reference": _uri_reference(iri=False, relative=True, absolute=True),
    "iri": _uri_reference(iri=True, relative=False, absolute=True),
    "iri-reference": _uri_reference(iri=True, relative=True, absolute=True),
    "json-pointer": _JSON_POINTER,
    "byte": "(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",
    "binary": "[\\s\\S]*",
    "password": "[\\s\\S]*",
    "relative-json-pointer": f"(?:[1-9]+0?|0)(?:#|{_JSON_POINTER})",
}


def pattern(name: str) -> str:
    """The anchored `pattern` enforcing format `name` (a key of PATTERNS)."""
    return f"^{PATTERNS[name]}$"


def canonical(name: str) -> str:
    """The name this module enforces format `name` under (draft 3's `host-name` is `hostname`)."""
    return ALIASES.get(name, name)


def is_known(name: str) -> bool:
    return canonical(name) in NATIVE or name in PATTERNS


def is_standard(name: str) -> bool:
    return is_known(name) or name in STANDARD_REFUSED
