"""A simulated user's coding style: deterministic source transforms of Python code.

The tab-completion benchmark (:mod:`cl_arch.eval.tabcomplete`) gives every simulated user a
codebase written in a convention drawn per user, one the model, pretrained on the standard
library as written (4-space indents, mostly single quotes, snake_case), cannot know in advance:

=============  ================================================================================
``indent``     ``"4"`` (as written), ``"2"`` or ``"tab"``: each block level's 4 spaces become 2
               spaces or one tab; continuation lines and docstring bodies keep their alignment
               relative to the statement they belong to (shifted with it)
``quotes``     ``"keep"``, ``"double"``, ``"single"`` or ``"swap"``: single-line string
               literals whose body holds neither quote character get the chosen delimiter
               (``swap``: the other one); triple-quoted strings are left alone
``naming``     ``"keep"`` or ``"camel"``: snake_case names *defined in the file* (functions,
               arguments, assigned names and attributes; not imports, dunders, CONSTANTS) become
               camelCase wherever they occur as a name token
=============  ================================================================================

Every transform is a pure function of ``(bytes, style)`` built on :mod:`tokenize` (comments and
string contents are never rewritten, except docstring indentation). A file that does not
tokenize is returned unchanged. ``naming`` and ``quotes`` preserve the program (same AST up to the
renaming); ``indent`` preserves it up to docstring indentation. The user accepts a suggestion
only as far as it matches the styled line.
"""
from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

INDENTS = ("4", "2", "tab")
QUOTES = ("keep", "double", "single", "swap")
NAMINGS = ("keep", "camel")


@dataclass(frozen=True)
class Style:
    """One user's conventions (see the module docstring for the values)."""

    indent: str = "4"
    quotes: str = "keep"
    naming: str = "keep"

    def __post_init__(self) -> None:
        for field, allowed in (("indent", INDENTS), ("quotes", QUOTES), ("naming", NAMINGS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Style.{field} must be one of {allowed}, got {getattr(self, field)!r}")

    @property
    def is_identity(self) -> bool:
        return self == Style()

    def describe(self) -> str:
        return f"indent={self.indent},quotes={self.quotes},naming={self.naming}"

    @classmethod
    def parse(cls, text: str) -> "Style":
        """``"indent=2,quotes=double,naming=camel"`` (omitted fields keep their default)."""
        kw = dict(part.split("=", 1) for part in text.split(",") if part.strip())
        unknown = set(kw) - {"indent", "quotes", "naming"}
        if unknown:
            raise ValueError(f"unknown style fields {sorted(unknown)} in {text!r}")
        return cls(**{k.strip(): v.strip() for k, v in kw.items()})


def draw_style(seed: int) -> Style:
    """The style of user ``seed``: indent from {2, tab} (never as written, so every user differs
    from the pretraining corpus), quotes from {keep, double, swap}, naming from {keep, camel}."""
    rng = np.random.default_rng([seed, 14])
    return Style(indent=str(rng.choice(["2", "tab"])), quotes=str(rng.choice(["keep", "double", "swap"])),
                 naming=str(rng.choice(["keep", "camel"])))


# ---------------------------------------------------------------------------- helpers
def _tokens(text: str) -> Optional[List[tokenize.TokenInfo]]:
    try:
        return list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None


def _replace_tokens(text: str, edits: Dict[tuple, str]) -> str:
    """``edits``: ``(row, col, end_col) -> new text`` of single-line tokens (1-based rows)."""
    lines = text.splitlines(keepends=True)
    by_row: Dict[int, List[tuple]] = {}
    for (row, c0, c1), new in edits.items():
        by_row.setdefault(row, []).append((c0, c1, new))
    for row, items in by_row.items():
        line = lines[row - 1]
        for c0, c1, new in sorted(items, reverse=True):
            line = line[:c0] + new + line[c1:]
        lines[row - 1] = line
    return "".join(lines)


# ---------------------------------------------------------------------------- quotes
_PREFIX = re.compile(r"^[A-Za-z]*")


def restyle_quotes(text: str, quotes: str) -> str:
    """Rewrite the delimiters of single-line, non-triple-quoted string literals whose body has no
    quote character at all (so the swap is always legal and ``swap`` is an involution)."""
    if quotes == "keep":
        return text
    toks = _tokens(text)
    if toks is None:
        return text
    edits = {}
    for t in toks:
        if t.type != tokenize.STRING or t.start[0] != t.end[0]:
            continue
        prefix = _PREFIX.match(t.string).group(0)
        rest = t.string[len(prefix):]
        if rest[:3] in ('"""', "'''") or len(rest) < 2:
            continue
        q, body = rest[0], rest[1:-1]
        if "'" in body or '"' in body:
            continue
        new_q = {"double": '"', "single": "'", "swap": "'" if q == '"' else '"'}[quotes]
        if new_q != q:
            edits[(t.start[0], t.start[1], t.end[1])] = prefix + new_q + body + new_q
    return _replace_tokens(text, edits)


# ---------------------------------------------------------------------------- naming
def snake_to_camel(name: str) -> str:
    """``_parse_float`` -> ``_parseFloat``; leading/trailing underscores kept; others unchanged."""
    core = name.strip("_")
    if "_" not in core or core.isupper() or not core:
        return name
    lead = name[:len(name) - len(name.lstrip("_"))]
    trail = name[len(name.rstrip("_")):]
    parts = [p for p in core.split("_") if p]
    return lead + parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:]) + trail


def defined_names(tree: ast.AST) -> set:
    """Names the file defines: functions, classes, arguments, assignment targets (names and
    attributes), minus every imported name."""
    out, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                imported.add((a.asname or a.name).split(".")[0])
                imported.add(a.name.split(".")[-1])
    return out - imported


def restyle_names(text: str, naming: str) -> str:
    """snake_case -> camelCase for the names :func:`defined_names` finds, at every NAME token
    (a rename whose target already occurs in the file, or collides with another, is skipped)."""
    if naming == "keep":
        return text
    toks = _tokens(text)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    if toks is None:
        return text
    present = {t.string for t in toks if t.type == tokenize.NAME}
    mapping: Dict[str, str] = {}
    taken = set(present)
    for name in sorted(defined_names(tree)):
        if name.startswith("__") and name.endswith("__"):
            continue
        new = snake_to_camel(name)
        if new == name or new in taken or keyword.iskeyword(new):
            continue
        mapping[name] = new
        taken.add(new)
    edits = {(t.start[0], t.start[1], t.end[1]): mapping[t.string]
             for t in toks if t.type == tokenize.NAME and t.string in mapping}
    return _replace_tokens(text, edits)


# ---------------------------------------------------------------------------- indentation
def _lead(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def restyle_indent(text: str, indent: str) -> str:
    """Re-indent: a statement (or comment-only line) led by ``n`` spaces gets ``n // 4`` units
    (2 spaces or a tab) plus ``n % 4`` spaces; a continuation line or docstring line is shifted
    with its statement (its extra spaces beyond the statement's indent kept). Lines inside other
    multi-line strings, and lines led by a tab, are left alone."""
    if indent == "4":
        return text
    toks = _tokens(text)
    if toks is None:
        return text
    unit = "  " if indent == "2" else "\t"

    def block(n: int) -> str:
        return unit * (n // 4) + " " * (n % 4)

    kind: Dict[int, tuple] = {}  # row -> ("stmt",) | ("shift", old_base, new_base) | ("keep",)
    at_start, base = True, (0, "")
    prev_sig = None
    for i, t in enumerate(toks):
        if t.type in (tokenize.NEWLINE,):
            at_start = True
        if t.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            if t.type != tokenize.NL:
                prev_sig = t.type
            continue
        row = t.start[0]
        if t.type == tokenize.COMMENT:
            kind.setdefault(row, ("stmt",) if at_start else ("shift",) + base)
            continue
        if at_start:
            n = _lead(t.line)
            base = (n, block(n))
            kind[row] = ("stmt",)
            at_start = False
        else:
            kind.setdefault(row, ("shift",) + base)
        if t.type == tokenize.STRING and t.end[0] > row:
            nxt = next((u for u in toks[i + 1:] if u.type not in (tokenize.COMMENT,)), None)
            doc = prev_sig in (None, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and kind[row] == ("stmt",) \
                and nxt is not None and nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
            for r in range(row + 1, t.end[0] + 1):
                kind[r] = ("shift",) + base if doc else ("keep",)
        prev_sig = t.type
    lines = text.splitlines(keepends=True)
    for r, line in enumerate(lines, start=1):
        k = kind.get(r, ("stmt",))
        if k[0] == "keep" or line.startswith("\t"):
            continue
        n = _lead(line)
        if n == 0 or line[n:].strip("\r\n") == "":
            continue
        if k[0] == "stmt" or n < k[1]:
            lines[r - 1] = block(n) + line[n:]
        else:
            lines[r - 1] = k[2] + " " * (n - k[1]) + line[n:]
    return "".join(lines)


# ---------------------------------------------------------------------------- all together
def apply_style(data: bytes, style: Style) -> bytes:
    """The file ``data`` (UTF-8 Python source) as user ``style`` writes it: names, then quotes,
    then indentation. Bytes that are not UTF-8 are returned unchanged."""
    if style.is_identity:
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    text = restyle_names(text, style.naming)
    text = restyle_quotes(text, style.quotes)
    text = restyle_indent(text, style.indent)
    return text.encode("utf-8")


__all__ = ["Style", "INDENTS", "QUOTES", "NAMINGS", "draw_style", "apply_style", "restyle_quotes", "restyle_names",
           "restyle_indent", "snake_to_camel", "defined_names"]
