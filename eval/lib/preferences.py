"""Hidden preferences: users who read the same text and differ only in which suggestions they accept
(docs/results/preferences.md; the benchmark is :mod:`cl_arch.eval.preferences`).

The shared text is a package's source whose quote convention is mixed: every plain single-line string
literal gets ``'`` or ``"`` at random (a seeded draw, the same for every user), so reading it says
nothing about which quote a user wants. A suggestion point opens at each such literal: the model
proposes up to ``max_len`` bytes greedily from the text before it, the first byte one of the two
quotes. A user has a hidden quote for each of two kinds of place (inside brackets after ``( [ { , :``,
and everywhere else) and keeps the suggestion's longest prefix that agrees with the text written with
that quote: accepted (reward 1) when that includes the quote. Characters saved: the bytes kept.

:func:`simulate` runs every user's rows at once on one reading of the text. The reading state at a
point is the same for every row (suggestions are never read: the user's buffer is the shared text, a
session's ``verdict(r, keep=False)``), so rows differ only in their verdict memory's ``Q``. The
decode follows the distinct prefixes the rows generate (usually one or two) with one forward each and
adds each row's own read ``scale * phi(h)^T Q_row``: the logits every row would get from its own
session, at the cost of a handful of forwards per suggestion.
"""
from __future__ import annotations

import io
import tokenize
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cl_arch import PlasticTransformer

QUOTES = (ord("'"), ord('"'))
QUOTE_IDS = torch.tensor(QUOTES)
BRACKET_OPENERS = ("(", "[", "{", ",", ":")
ROWS = ("rewarded", "unrewarded", "yoked", "reset")


@dataclass(frozen=True)
class Point:
    """A suggestion point: byte ``offset`` of the literal's opening quote in the shared text, the
    literal's ``body`` (bytes between the quotes), its ``kind`` (0: inside brackets, 1: elsewhere)
    and the index of the ``file`` it is in."""

    offset: int
    body: bytes
    kind: int
    file: int


def _plain_literal(tok: str) -> bool:
    """A single-line, unprefixed, non-triple string literal whose body holds no quote or backslash."""
    if len(tok) < 2 or tok[0] not in "'\"" or tok[-1] != tok[0] or tok.startswith(("'''", '"""')):
        return False
    body = tok[1:-1]
    return not any(c in body for c in "'\"\\\n") and body.isascii()


def mix_quotes(src: bytes, rng: np.random.Generator) -> Tuple[bytes, List[Tuple[int, bytes, int]]]:
    """``src`` with every plain literal's quotes drawn at random, and its literals as
    ``(byte offset, body, kind)``. A file that does not tokenize is returned unchanged, without points."""
    try:
        toks = list(tokenize.tokenize(io.BytesIO(src).readline))
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return src, []
    lines = src.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(x) for x in lines]).tolist()
    out = bytearray(src)
    points = []
    prev = None
    for t in toks:
        if t.type == tokenize.STRING and _plain_literal(t.string):
            line = lines[t.start[0] - 1].decode("utf-8", "replace")
            at = starts[t.start[0] - 1] + len(line[:t.start[1]].encode("utf-8"))
            q = QUOTES[int(rng.integers(2))]
            out[at] = out[at + len(t.string) - 1] = q
            kind = 0 if (prev is not None and prev.string in BRACKET_OPENERS) else 1
            points.append((at, t.string[1:-1].encode(), kind))
        if t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING):
            prev = t
    return bytes(out), points


def shared_text(files: Sequence[str], n_points: int, seed: int) -> Tuple[bytes, List[Point]]:
    """The package's files, quotes mixed (seed ``seed``), concatenated in order until ``n_points``
    suggestion points are reached; the text ends at the line after the last point. A package with
    fewer points is read again from its first file, with new quotes drawn (the same code, worked on
    again: reading it twice still says nothing about which quote a user wants); every file read
    counts as a new file (``Point.file``)."""
    rng = np.random.default_rng(seed)
    text, points = bytearray(), []
    sources = []
    for path in files:
        with open(path, "rb") as f:
            sources.append(f.read())
    fi = 0
    while len(points) < n_points:
        found = 0
        for src in sources:
            mixed, lits = mix_quotes(src, rng)
            base = len(text)
            text += mixed if mixed.endswith(b"\n") else mixed + b"\n"
            for at, body, kind in lits[:n_points - len(points)]:
                points.append(Point(base + at, body, kind, fi))
            found += len(lits)
            fi += 1
            if len(points) >= n_points:
                end = text.find(b"\n", points[-1].offset)
                return bytes(text[:end + 1]), points
        if found == 0:
            raise ValueError(f"the files hold no suggestion point (plain single-line string literal); "
                             f"{n_points} were asked for")
    return bytes(text), points


def draw_users(n: int, seed: int) -> Tuple[np.ndarray, List[int]]:
    """``[n, 2]`` hidden quotes (byte values) per user and kind of place, and whose rewards each user's
    yoked row gets. The four kinds of user (a quote per kind of place) come in equal shares, in an order
    drawn with ``seed`` (``n`` a multiple of 4 keeps every share equal); the yoke is a derangement
    drawn with the same seed."""
    rng = np.random.default_rng(seed)
    types = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])[rng.permutation(np.arange(n) % 4)]
    while True:
        yoke = rng.permutation(n)
        if n < 2 or not np.any(yoke == np.arange(n)):
            return np.asarray(QUOTES)[types], [int(x) for x in yoke]


def accepted_chars(suggestion: bytes, target: bytes) -> int:
    """How much of ``suggestion`` the user keeps: its longest prefix that agrees with ``target`` (the
    user's version of the text from the point on)."""
    n = 0
    for a, b in zip(suggestion, target):
        if a != b:
            break
        n += 1
    return n


def user_target(text: bytes, point: Point, quote: int, max_len: int) -> bytes:
    """The first ``max_len`` bytes of ``text`` from ``point`` on with the literal's quotes as ``quote``."""
    end = point.offset + len(point.body) + 2
    return (bytes([quote]) + point.body + bytes([quote]) + text[end:end + max_len])[:max_len]


@dataclass
class _Node:
    state: object
    logits: torch.Tensor  # [V] base logits (Q = 0) after this prefix
    phi: torch.Tensor     # [F] the verdict key phi(h) of this prefix's last position


@torch.no_grad()
def decode_rows(model: PlasticTransformer, root: _Node, Q: torch.Tensor, max_len: int,
                vi: int) -> Tuple[List[bytes], List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Greedy suggestions (up to ``max_len`` bytes or a newline) of ``R = Q.shape[0]`` rows from the
    reading state ``root``; row ``r`` reads ``scale phi(h)^T Q[r]`` on top of the model's logits.

    Returns the suggestions and the trace as terms ``(cols [C], phi [R, C], e(a) - pi [R, V])``, one per
    step: ``E = sum phi g^T`` on the features ``cols`` where some row's key fires (keys are sparse, so
    this is the dense trace's only nonzero rows; rows already finished contribute zeros)."""
    mem = model.verdict
    R = Q.shape[0]
    nodes: Dict[Tuple[int, ...], _Node] = {(): root}
    seqs: List[List[int]] = [[] for _ in range(R)]
    scale = mem.read_scale.to(Q.dtype)
    terms = []
    for _ in range(max_len):
        active = [r for r in range(R) if not (seqs[r] and seqs[r][-1] == 10)]
        if not active:
            break
        keys = [tuple(seqs[r]) for r in range(R)]
        uniq = sorted(set(keys))
        phi_u = torch.stack([nodes[k].phi for k in uniq]).to(Q.dtype)                # [N, F]
        where = torch.tensor([uniq.index(k) for k in keys])
        cols = (phi_u > 0).any(0).nonzero()[:, 0]
        phi = phi_u[where][:, cols]                                                  # [R, C]
        base = torch.stack([nodes[k].logits for k in keys]).to(Q.dtype)
        logits = base + torch.einsum("rc,rhcv,h->rv", phi, Q[:, :, cols], scale)
        if not seqs[0]:  # the first byte is one of the two quotes: a string opens here
            logits = torch.full_like(logits, -torch.inf).index_copy(1, QUOTE_IDS, logits[:, QUOTE_IDS])
        tok = logits.argmax(-1)
        live = torch.zeros(R, 1, dtype=Q.dtype)
        live[active] = 1.0
        g = torch.nn.functional.one_hot(tok, logits.shape[-1]).to(Q.dtype) - torch.softmax(logits, -1)
        terms.append((cols, phi * live, g))
        for r in active:
            seqs[r].append(int(tok[r]))
            k = tuple(seqs[r])
            if k not in nodes:
                lg, st = model(torch.tensor([[k[-1]]]), state=nodes[k[:-1]].state)
                nodes[k] = _Node(st, lg[0, -1], st.fast()[vi].conv[0, -1])
    return [bytes(x) for x in seqs], terms


def commit_terms(Q: torch.Tensor, terms, step: torch.Tensor) -> None:
    """``Q += step[r] * E[r]`` in place (``step [R]``: ``eta (r - b)`` per row; ``E`` as :func:`decode_rows`'
    terms): the verdict memory's commit (``gamma 1, eta_s 0``, no clip) on the trace's nonzero rows."""
    cols = torch.cat([c for c, _, _ in terms])
    delta = torch.cat([step[:, None, None] * phi[:, :, None] * g[:, None, :] for _, phi, g in terms], dim=1)
    Q.index_add_(2, cols, delta[:, None].expand(-1, Q.shape[1], -1, -1))


def _outcomes(sugg: List[bytes], text: bytes, point: Point, users: np.ndarray, max_len: int):
    """Characters kept per row (``U`` rewarded, ``U`` yoked, ``U`` reset, each judged by its user) and per
    user for the shared unrewarded suggestion (the last row)."""
    U = users.shape[0]
    targets = [user_target(text, point, int(q), max_len) for q in users[:, point.kind]]
    own = np.array([accepted_chars(sugg[r], targets[r % U]) for r in range(3 * U)], dtype=float)
    shared = np.array([accepted_chars(sugg[3 * U], t) for t in targets], dtype=float)
    return own, shared


@torch.no_grad()
def simulate(model: PlasticTransformer, text: bytes, points: Sequence[Point], users: np.ndarray, max_len: int,
             yoke: Optional[Sequence[int]] = None, progress=None,
             final: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, np.ndarray]:
    """Every user's rows over the shared ``text`` and its ``points`` (:func:`shared_text`), with the
    model's verdict memory (its ``eta``, ``scale`` and keys) and a session's baseline (``rho`` of the
    model's config, ``b0 = 0``). A suggestion is accepted (reward 1) when the user keeps at least its
    first byte (the quote), else rejected (reward 0); characters saved: the bytes kept.

    Rows per user ``u``: ``rewarded`` (Q learns from u's verdicts on its own suggestions), ``yoked``
    (Q learns from its own suggestions with the verdict the rewarded row ``yoke[u]`` got at the same
    point), ``reset`` (as rewarded, with Q and baseline cleared at every new file), ``unrewarded``
    (Q = 0: the same reading, no verdict; one suggestion judged by every user).

    Returns ``{row: accepted [U, N]}`` and ``{row + "_chars": characters saved [U, N]}``; ``final``, when
    given, receives the rows' last ``Q [3U + 1, H, F, V]`` and baselines ``b [3U + 1]``.
    """
    mem = model.verdict
    eta = float(mem.commit_rates()["eta_r"][0])
    vi = model.fast_layer_names().index("verdict")
    U, N = users.shape[0], len(points)
    yoke = [(u + 1) % U for u in range(U)] if yoke is None else list(yoke)
    R = 3 * U + 1
    Q = torch.zeros(R, mem.n_heads, mem.head_k_dim, mem.head_v_dim)
    b = torch.zeros(R)
    out = {k: np.zeros((U, N)) for r in ROWS for k in (r, r + "_chars")}
    state, pos, last_file = model.init_state(1), 0, None
    for n, pt in enumerate(points):
        logits, state = model(torch.tensor([list(text[pos:pt.offset])]), state=state)
        pos = pt.offset
        if pt.file != last_file:
            Q[2 * U:3 * U] = 0.0
            b[2 * U:3 * U] = 0.0
            last_file = pt.file
        sugg, terms = decode_rows(model, _Node(state, logits[0, -1], state.fast()[vi].conv[0, -1]), Q, max_len, vi)
        own, shared = _outcomes(sugg, text, pt, users, max_len)
        acc = (own > 0).astype(float)
        r = torch.tensor(np.concatenate([acc[:U], acc[yoke], acc[2 * U:], [0.0]]), dtype=Q.dtype)
        live = torch.ones(R, dtype=Q.dtype)
        live[-1] = 0.0  # the unrewarded row never commits
        commit_terms(Q, terms, eta * (r - b) * live)
        b = b + model.config.baseline_rho * (r - b) * live
        for j, row in enumerate(("rewarded", "yoked", "reset")):
            out[row][:, n] = acc[j * U:(j + 1) * U]
            out[row + "_chars"][:, n] = own[j * U:(j + 1) * U]
        out["unrewarded"][:, n] = (shared > 0).astype(float)
        out["unrewarded_chars"][:, n] = shared
        if progress is not None:
            progress(n)
    if final is not None:
        final.update(Q=Q, b=b)
    return out


def decode_speed(model: PlasticTransformer, tokens: int = 128, repeats: int = 7, seed: int = 0) -> Dict[str, float]:
    """Tokens per second of ``Session.generate`` (greedy, ``tokens`` new tokens after a 64-byte prompt)
    with the verdict memory on (a nonzero ``Q``: its read, and the trace built token by token) and off
    (``model.memories_off("verdict")``); medians of ``repeats`` runs, on and off interleaved."""
    import statistics
    import time

    from cl_arch import Session

    vi = model.fast_layer_names().index("verdict")
    prompt = list(b"import os\n\n\ndef main(path):\n    name = os.path.basename(path)\n    return name + ")[:64]
    g = torch.Generator().manual_seed(seed)
    Q = 0.01 * torch.randn(1, *model.fast_layers()[vi].W0.shape, generator=g)

    def once(on: bool) -> float:
        s = Session(model, seed=seed)
        if on:
            s.P[vi] = Q.clone()
            s.reset(persistent=False)
        t = time.perf_counter()
        s.generate(prompt, max_new_tokens=tokens, temperature=0)
        return tokens / (time.perf_counter() - t)

    on, off = [], []
    for _ in range(repeats):
        on.append(once(True))
        with model.memories_off("verdict"):
            off.append(once(False))
    return {"on_tokens_per_s": statistics.median(on), "off_tokens_per_s": statistics.median(off),
            "slowdown": statistics.median(off) / statistics.median(on), "tokens": tokens, "repeats": repeats}


__all__ = ["Point", "ROWS", "QUOTES", "mix_quotes", "shared_text", "draw_users", "accepted_chars", "user_target",
           "decode_rows", "commit_terms", "simulate", "decode_speed"]
