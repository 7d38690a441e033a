"""Forward passes over sessions: eval mode, and batched generation for several sessions.

:func:`batch_generate` and :func:`_step_batch` are :meth:`Session.batch_generate
<cl_arch.session.Session.batch_generate>` and ``Session._step_batch``; they drive each
session through its own bookkeeping (``_mark``, ``_feed``, ``_absorb``, ``_back_to``).
:func:`_eval_mode` is the context of every forward a session runs.
"""
import json
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..state import ModelState
from . import decoding
from .inputs import _as_ids, _check_logits, _check_sampling
from .sampling import _sample


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode and no autograd for the duration; the model's previous mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def batch_generate(sessions: Sequence[Any], prompts: Sequence[Any], max_new_tokens: int = 32,
                   temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   seeds: Optional[Sequence[Optional[int]]] = None,
                   allowed_tokens: Optional[Sequence[int]] = None) -> List[List[int]]:
    """:meth:`Session.generate` for several sessions at once, decoding in batched forwards.

    Prompts (of any lengths) are read session by session; then every decode step runs one
    forward over all sessions with their states (and so their P) stacked along the batch.
    Each session samples from its own generator, so the result equals calling
    ``s.generate(p, ...)`` on each session in turn (to float rounding of batched matmuls).

    Sessions must share one model object and their ``lam`` setting. Where they share a ``decoder``
    setting (not None) and ``max_new_tokens > 1``, the tokens run through a cached
    :class:`~cl_arch.decode.Decoder` of batch size ``len(sessions)`` (:class:`Session`'s ``decoder``),
    each row at its own position (prompts of any lengths): the states are loaded once and taken back
    at the end. On the forward path (one token, or ``decoder=None``) a model with attention layers
    decodes the sessions at different positions in separate forwards.

    Returns:
        One list of new token ids per session.

    Raises:
        ValueError: bad arguments, or non-finite logits from the model; every session is
            then as it was before the call.
    """
    sessions = list(sessions)
    if not sessions:
        raise ValueError("batch_generate: no sessions")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("batch_generate: a session appears twice")
    if len(prompts) != len(sessions):
        raise ValueError(f"batch_generate: {len(sessions)} sessions but {len(prompts)} prompts")
    model = sessions[0].model
    if any(s.model is not model for s in sessions):
        raise ValueError("batch_generate: sessions must share one model object")
    if len({json.dumps(s._lam_arg()) for s in sessions}) > 1:
        raise ValueError("batch_generate: sessions have different lam settings")
    if seeds is not None and len(seeds) != len(sessions):
        raise ValueError(f"batch_generate: {len(sessions)} sessions but {len(seeds)} seeds")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    parsed = [_as_ids(p, model.config.vocab_size, f"prompts[{i}]", allow_empty=True)
              for i, p in enumerate(prompts)]
    for i, (s, p) in enumerate(zip(sessions, parsed)):
        if p.shape[1] == 0 and s._next_logits is None:
            raise ValueError(f"prompts[{i}] is empty and session {i} has no tokens to continue from")
    allowed = None
    if allowed_tokens is not None:
        allowed = _as_ids(list(allowed_tokens), model.config.vocab_size, "allowed_tokens")[0]
    gens = [s._rng if (seeds is None or seeds[i] is None) else torch.Generator().manual_seed(int(seeds[i]))
            for i, s in enumerate(sessions)]
    marks = [s._mark() for s in sessions]
    try:
        read_prompts(sessions, parsed)
        dec = decoding.batch_decoder(sessions, max_new_tokens)
        if dec is not None:
            after = [s._mark() for s in sessions]
            gen_states = [g.get_state() for g in gens]
            try:
                return decoding.batch_tokens(sessions, dec, max_new_tokens, float(temperature), top_k, top_p,
                                             allowed, gens)
            except Exception:  # noqa: BLE001 - the forward path redoes the decode from after the prompts
                for s, m in zip(sessions, after):
                    s._back_to(m)
                for g, st in zip(gens, gen_states):
                    g.set_state(st)
        has_attn = any(m is None for m in model.memories())  # a None slot is an attention (KV) cache
        out: List[List[int]] = [[] for _ in sessions]
        for _ in range(max_new_tokens):
            toks = [_sample(s._next_logits, float(temperature), top_k, top_p, allowed, g)
                    for s, g in zip(sessions, gens)]
            # Fast layers ignore the position, so an all-fast model batches every session at
            # once; attention needs one position (and cache length) per batch.
            groups: Dict[int, List[int]] = {}
            for i, s in enumerate(sessions):
                groups.setdefault(s.state.position if has_attn else 0, []).append(i)
            grads = [s._policy_gradients(t, allowed) for s, t in zip(sessions, toks)]
            for idx in groups.values():
                _step_batch([sessions[i] for i in idx], [toks[i] for i in idx])
            for s, g in zip(sessions, grads):
                s._add_traces(g)
            for i, t in enumerate(toks):
                out[i].append(t)
    except BaseException:
        for s, mark in zip(sessions, marks):
            s._back_to(mark)
        raise
    return out


def read_prompts(sessions: Sequence[Any], parsed: Sequence[torch.Tensor]) -> None:
    """Each session reads its prompt (``[1, T]`` ids, T may be 0) and opens the suggestion its tokens start,
    with its own copy of every verdict trace (what a decode after prompts starts from)."""
    for s, p in zip(sessions, parsed):
        if p.shape[1]:
            s._feed(p)
            s._pending = None
        s._open_suggestion()
        s._own_trace()


def _step_batch(sessions: List[Any], toks: List[int]) -> None:
    """One batched forward of one token per session; each session's state advances."""
    model = sessions[0].model
    if len(sessions) == 1:
        sessions[0]._feed(torch.tensor([[toks[0]]]))
        return
    positions = [s.state.position for s in sessions]
    states = []
    for s in sessions:
        st = model.materialize_state(s.state, 1)
        states.append(ModelState(st.layers, positions[0]))
    big = ModelState.stack(states)
    ids = torch.tensor(toks, dtype=torch.long).reshape(-1, 1).to(model.device)
    with _eval_mode(model):
        logits, new = model(ids, state=big, lam=sessions[0]._lam_arg())
    _check_logits(logits)
    for i, s in enumerate(sessions):
        row = new.select(i).clone()  # own storage: no session holds a view of another's rows
        s._absorb(ids[i], logits[i], ModelState(row.layers, positions[i] + 1))
