"""A whole-model decode step on state buffers allocated once (issue 26; gpt-fast's decode loop for this model).

``model(ids[:, None], state=state)`` returns a new :class:`~cl_arch.state.ModelState` per token: the
fast layers' and memories' ``S`` and ``E``, the caches, each a new tensor, because a session keeps
every step's state as a value. :class:`Decoder` instead holds one buffer per state tensor and
updates it in place, so a token allocates nothing the size of a state, reads nothing back to the host
and can be one ``torch.compile`` graph with static shapes; :meth:`Decoder.state` and
:meth:`Decoder.load_state` convert to and from the ``ModelState`` sessions and files hold.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from ..memory import FastWeightLayer
from ..memory.episodic import EpisodicMemory
from ..memory.verdict import VerdictMemory
from ..state import ModelState, check_step_inputs
from .slots import (
    AttnSlot,
    DenseOutSlot,
    EpisodicSlot,
    FastSlot,
    LazyOutSlot,
    VerdictSlot,
)

log = logging.getLogger(__name__)
COMPILE_MODES = ("auto", True, False)
# Inductor settings of the compiled step. A decode step is a few dozen small kernels over ~100 input tensors
# (the state buffers and weights), so the Python that calls them costs as much as their arithmetic: the C++
# wrapper calls them from C++, and the per-input size/stride asserts repeat what dynamo's guards check before
# every call. Together 1.2-1.3x on the shipped model's step (benchmarks/bench_decode.py --compile-options).
COMPILE_OPTIONS = {"cpp_wrapper": True, "size_asserts": False}
# Dynamo keeps one graph per batch size, compile options and host flag the step branches on (a verdict memory
# still zero), all on one code object, and past its recompile_limit (8) silently runs the step eagerly: a
# server whose batch walks through 1, 2, 4 ... 64 rows with and without verdicts needs more. The limit is
# raised only around a decoder's first step after a load, where a new graph can be needed.
RECOMPILE_LIMIT = 64
_warned: set = set()


def default_active(memory) -> int:
    """How many of an episodic key's ``F`` features a step keeps: the expected count at the key
    threshold ``theta`` (``F (1 - Phi(theta))`` for ``R``'s Gaussian rows against a unit ``h``) plus
    8 standard deviations and 16, at most ``F``. A key that fires more is truncated to its largest
    ``n`` entries; the decoder records the most that fired (:meth:`Decoder.overflowed`)."""
    Fdim = memory.head_k_dim
    theta = max(float(memory.key_threshold.detach()), 0.0)
    p = 0.5 * math.erfc(theta / math.sqrt(2.0))
    return min(Fdim, int(Fdim * p + 8.0 * math.sqrt(Fdim * p * (1.0 - p)) + 16))


class Decoder:
    """One-token decode steps of a :class:`~cl_arch.model.PlasticTransformer` for ``batch_size`` streams.

    Args:
        model: the model, in eval mode; its weights are read each step, its constant rates (decays,
            trace settings) once here: build a new decoder after changing the weights.
        batch_size: ``B``, the streams decoded together.
        max_len: the most positions an attention layer without a window may reach (its KV buffer);
            not needed when every attention layer has a window.
        compile: ``True`` (``torch.compile`` the step; errors propagate), ``False`` (eager) or
            ``"auto"`` (compile; on any failure fall back to eager, logged once per reason).
            ``CL_ARCH_DECODE_COMPILE=0`` turns ``"auto"`` into eager.
        lam: the forward's ``lam`` (a float for every fast layer, or one entry per fast layer).
        n_active: active features kept per episodic/verdict key (default :func:`default_active`).

    After construction the buffers hold a fresh episode (``model.init_state``); :meth:`prefill` or
    :meth:`load_state` set them. :meth:`step` runs one token per stream.
    """

    rows_own_positions = True  # load_rows takes rows at different positions (each its own rotary angle and mask)
    compile_options = COMPILE_OPTIONS  # torch.compile(options=...) of the step; set before the first step
    compile_backend = "inductor"  # torch.compile(backend=...): another backend gets no options

    def __init__(self, model, batch_size: int, max_len: int | None = None,
                 compile: str | bool = "auto", lam=None, n_active: int | None = None) -> None:
        self._init_common(model, batch_size, max_len, compile, lam)
        dtype = model.embed.weight.dtype
        n_fast = len(model.fast_layers())
        lams = [lam] * n_fast if (lam is None or isinstance(lam, (int, float))) else list(lam)
        if len(lams) != n_fast:
            raise ValueError(f"lam must be a float or have one entry per fast layer ({n_fast}), got {len(lams)}")
        lam_iter = iter(lams)
        self.slots: list[object] = []
        for block in model.blocks:
            if isinstance(block.mixer, FastWeightLayer):
                self.slots.append(FastSlot(block.mixer, batch_size, next(lam_iter)))
            else:
                att = block.mixer
                L = att.window if att.window is not None else max_len
                if L is None:
                    raise ValueError(f"attention layer {att.layer_idx} has no window: give max_len (its KV buffer)")
                self.slots.append(AttnSlot(att, batch_size, L, dtype))
        for mem in model.output_memories():
            lam_m = next(lam_iter)
            n = n_active if n_active is not None else (default_active(mem) if isinstance(mem, EpisodicMemory) else 0)
            if isinstance(mem, VerdictMemory):
                self.slots.append(VerdictSlot(mem, batch_size, n))
            elif isinstance(mem, EpisodicMemory):
                self.slots.append(EpisodicSlot(mem, batch_size, n))
            elif hasattr(mem, "key_kind") and mem.write.name in ("delta", "error"):
                lazy = mem.trace_follows_state and not os.environ.get("CL_ARCH_DECODE_DENSE_READOUT")
                self.slots.append((LazyOutSlot if lazy else DenseOutSlot)(mem, batch_size, lam_m))
            else:
                raise ValueError(f"Decoder has no step for the {type(mem).__name__} memory {mem.config.name!r}")
        _share_projection(self.slots)
        attn = [b.mixer for b in model.blocks if not isinstance(b.mixer, FastWeightLayer)]
        hd = attn[0].head_dim if attn else 2
        theta = attn[0].rotary.theta if attn else 10000.0
        cdt = torch.promote_types(dtype, torch.float32)
        self._inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=cdt) / hd)
        self._ones = torch.ones(batch_size, dtype=cdt)
        self.load_state(model.init_state(batch_size))

    def _init_common(self, model, batch_size: int, max_len: int | None, compile: str | bool, lam) -> None:
        """Argument checks and the buffers every decoder has (positions, the logits, the compile mode)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if model.training:
            raise ValueError("Decoder needs the model in eval mode (model.eval()): it runs no dropout")
        if model.device.type != "cpu":
            raise ValueError(f"Decoder runs on the CPU (buffers are allocated there); the model is on {model.device}")
        self.model, self.B, self.max_len, self._lam = model, batch_size, max_len, lam
        dtype = model.embed.weight.dtype if hasattr(model, "embed") else next(model.parameters()).dtype
        self.pos = torch.zeros(batch_size, dtype=torch.long)  # each row's next position, advanced in the step
        self.positions = [0] * batch_size  # the same on the host: bounds checks without a read
        self._logits = torch.zeros(batch_size, model.config.vocab_size, dtype=dtype)
        self._compiled = None
        self._fresh = True  # the next step may need a new graph (see RECOMPILE_LIMIT)
        # the step's inputs are copied here: dynamo guards on strides too, and a column of a prompt
        # (ids[:, -1]) has another stride than a sampled token, so each would compile its own graph
        self._ids = torch.zeros(batch_size, dtype=torch.long)
        self._mod = torch.ones(batch_size, dtype=torch.promote_types(dtype, torch.float32))
        env_off = os.environ.get("CL_ARCH_DECODE_COMPILE", "1") == "0"
        self.compile = False if (compile == "auto" and env_off) else compile

    # ------------------------------------------------------------------ state
    def load_state(self, state: ModelState) -> None:
        """Copy ``state`` (``B`` rows, e.g. a session's or ``ModelState.stack`` of several) into the buffers."""
        model = self.model
        check_step_inputs(torch.zeros(self.B, 1, dtype=torch.long), state, None, vocab_size=model.config.vocab_size,
                          memories=model.memories(), check_values=False, layout="the decoder's model")
        pos = state.position
        if self.max_len is not None and pos > self.max_len:
            raise ValueError(f"state is at position {pos}, beyond max_len {self.max_len}")
        full = model.materialize_state(state, self.B)
        with torch.no_grad():
            for slot, s, raw in zip(self.slots, full.layers, state.layers):
                if isinstance(slot, AttnSlot):
                    slot.load(s, pos)
                elif isinstance(slot, VerdictSlot):  # nothing writes S, so None (W0 + P) stays None
                    slot.load(s, raw)
                else:
                    slot.load(s)
        self.pos.fill_(pos)
        self.positions = [pos] * self.B
        self._fresh = True

    def load_rows(self, states) -> None:
        """Copy ``B`` one-row states, each at its own position (sessions with prompts of different lengths
        decoding together), into the buffers, row by row (:meth:`load_row`)."""
        states = list(states)
        if len(states) != self.B:
            raise ValueError(f"load_rows needs {self.B} states (one per row), got {len(states)}")
        for i, st in enumerate(states):  # every state checked before any row is written
            self._check_row(st, f"row {i}")
        for b, st in enumerate(states):
            self._load_row(b, st)

    def load_row(self, b: int, state: ModelState) -> None:
        """Copy a one-row ``state`` (at its own position) into row ``b``; the other rows go on as they were
        (a server's batch where one completion leaves and another joins)."""
        self._check_index(b)
        self._check_row(state, f"row {b}")
        self._load_row(b, state)

    def _check_index(self, b) -> None:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.B:
            raise ValueError(f"row must be an integer in [0, {self.B}), got {b!r}")

    def _check_row(self, st: ModelState, where: str) -> None:
        model = self.model
        check_step_inputs(torch.zeros(1, 1, dtype=torch.long), st, None, vocab_size=model.config.vocab_size,
                          memories=model.memories(), check_values=False, layout=f"the decoder's model ({where})")
        if self.max_len is not None and st.position > self.max_len:
            raise ValueError(f"{where}'s state is at position {st.position}, beyond max_len {self.max_len}")

    def _load_row(self, b: int, st: ModelState) -> None:
        full = self.model.materialize_state(st, 1)
        with torch.no_grad():
            for slot, s, raw in zip(self.slots, full.layers, st.layers):
                if isinstance(slot, AttnSlot):
                    slot.load(s, st.position, row=b)
                else:
                    slot.load_row(b, s, raw)
            self.pos[b] = st.position
        self.positions[b] = st.position
        self._fresh = True

    @property
    def position(self) -> int:
        """The rows' common next position (ValueError when :meth:`load_rows` left them at several)."""
        if len(set(self.positions)) > 1:
            raise ValueError(f"the decoder's rows are at different positions {self.positions}: use row_states()")
        return self.positions[0]

    def row_states(self) -> list:
        """One :class:`ModelState` of new tensors per row, each at its own position (see :meth:`state`)."""
        self.check_overflow()
        return [self._row_state(b) for b in range(self.B)]

    def row_state(self, b: int) -> ModelState:
        """Row ``b`` as a one-row :class:`ModelState` of new tensors at its position (``P`` as loaded)."""
        self._check_index(b)
        self.check_overflow()
        return self._row_state(b)

    def _row_state(self, b: int) -> ModelState:
        pos = self.positions[b]
        with torch.no_grad():
            layers = [slot.dump(pos, row=b) if isinstance(slot, AttnSlot) else slot.dump_row(b) for slot in self.slots]
        return ModelState(layers, pos)

    def state(self) -> ModelState:
        """The buffers as a :class:`ModelState` of new tensors (``P`` as loaded), e.g. for a session.

        Raises:
            RuntimeError: an episodic or verdict key fired more features than the decoder keeps
                (:meth:`overflowed`): the steps since were not exact.
        """
        self.check_overflow()
        layers = []
        with torch.no_grad():
            for slot in self.slots:
                layers.append(slot.dump(self.position) if isinstance(slot, AttnSlot) else slot.dump())
        return ModelState(layers, self.position)

    def overflowed(self) -> bool:
        """Whether some key fired more features than its slot's ``n`` (one host read)."""
        return any(int(s.overflow) > s.n for s in self.slots if isinstance(s, (EpisodicSlot, VerdictSlot)))

    def check_overflow(self) -> None:
        if self.overflowed():
            ns = {s.mem.config.name: (int(s.overflow), s.n) for s in self.slots if hasattr(s, "overflow")}
            raise RuntimeError(f"a key fired more features than the decoder keeps ({{name: (fired, kept)}}: {ns}): "
                               "build the Decoder with a larger n_active")

    # ------------------------------------------------------------------ decoding
    def prefill(self, ids: torch.Tensor, state: ModelState | None = None,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``ids [B, T]`` with the model's own (chunked) forward from ``state`` (None: the buffers'
        current state), then load the result: returns ``logits [B, T, vocab]``."""
        model = self.model
        if state is None:
            state = self.state()
        if ids.dim() != 2 or ids.shape[0] != self.B:
            raise ValueError(f"ids must be [B, T] with B = {self.B}, got shape {tuple(ids.shape)}")
        with torch.no_grad():
            logits, new = model(ids, state=state, modulation=modulation, lam=self._lam_arg())
        self.load_state(new)
        return logits

    def _lam_arg(self):
        return self._lam

    def step(self, ids: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
        """One token per stream: ``ids [B]`` (int64) -> ``logits [B, vocab]`` (a buffer the next step overwrites).

        ``modulation [B]`` in [0, 1] scales every fast memory's write strength on that row (0: writes off),
        None: 1. Shapes and dtypes are checked here; values are not read back (an id outside the
        vocabulary fails in the embedding)."""
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (self.B,) or ids.dtype != torch.long:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an int64 tensor of shape ({self.B},), got {got}"
                             f"{'' if not isinstance(ids, torch.Tensor) else ' ' + str(ids.dtype)}")
        if modulation is not None and (not isinstance(modulation, torch.Tensor) or tuple(modulation.shape) != (self.B,)):
            raise ValueError(f"modulation must be a [B] = ({self.B},) tensor or None")
        if self.max_len is not None and max(self.positions) >= self.max_len:
            raise ValueError(f"the decoder is at position {max(self.positions)} = max_len: no room in the KV buffer")
        self._ids.copy_(ids)
        self._mod.copy_(self._ones if modulation is None else modulation)
        with torch.no_grad():
            self._run(self._ids, self._mod)
        self.positions = [p + 1 for p in self.positions]
        self._fold()
        return self._logits

    def _run(self, ids: torch.Tensor, mod: torch.Tensor) -> None:
        if self.compile is False:
            return self._step_impl(ids, mod)
        if self._compiled is None:
            inductor = self.compile_backend == "inductor"
            self._compiled = torch.compile(self._step_impl, dynamic=False, backend=self.compile_backend,
                                           options=dict(self.compile_options) if inductor else None)
        if self.compile is True:
            return self._call_compiled(ids, mod)
        try:
            return self._call_compiled(ids, mod)
        except Exception as e:  # noqa: BLE001 - any compile failure: the eager step computes the same
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if reason not in _warned:
                _warned.add(reason)
                log.warning("Decoder: torch.compile failed (%s); decoding eagerly", reason)
            self.compile = False
            # inductor fails while tracing or compiling, before the graph has written any buffer
            return self._step_impl(ids, mod)

    def _call_compiled(self, ids: torch.Tensor, mod: torch.Tensor) -> None:
        if not self._fresh:
            return self._compiled(ids, mod)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        with config.patch(**{name: max(getattr(config, name), RECOMPILE_LIMIT)}):
            self._compiled(ids, mod)
        self._fresh = False

    def _fold(self) -> None:
        for s in self.slots:
            if isinstance(s, LazyOutSlot):
                s.fold()
            if isinstance(s, EpisodicSlot):
                s.steps = getattr(s, "steps", 0) + 1
                if s.steps >= s.fold_every:
                    s.st.renormalise()
                    s.steps = 0

    def _step_impl(self, ids: torch.Tensor, mod: torch.Tensor) -> None:
        """The whole step on the buffers: every update in place."""
        model = self.model
        x = model.embed(ids)  # [B, d]
        angles = self.pos.to(self._inv_freq.dtype)[:, None] * self._inv_freq  # [B, head_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [B, 1, 1, head_dim]: q, k [B, nh, 1, hd]
        cos, sin = angles.cos(), angles.sin()
        for block, slot in zip(model.blocks, self.slots):
            xn = block.mixer_norm(x)
            y = slot.step(xn, mod) if isinstance(slot, FastSlot) else slot.step(xn, self.pos, cos, sin)
            x = x + y
            x = x + block.mlp(block.mlp_norm(x))
        h = model.norm_f(x)
        logits = model.lm_head(h)
        for slot in self.slots[len(model.blocks):]:
            if isinstance(slot, VerdictSlot):
                read = slot.step(h)
                if read is not None:
                    logits = logits + read
            else:
                logits = logits + slot.step(h, ids, logits, mod, model.embed, model.lm_head)
        self._logits.copy_(logits)
        self.pos.add_(1)

    def reinforce(self, tokens: torch.Tensor) -> None:
        """The verdict memory's trace step for ``tokens [B]`` sampled from the last :meth:`step`'s logits
        (what a session does after each generated token; :meth:`VerdictMemory.reinforce`), in place."""
        for s in self.slots:
            if isinstance(s, VerdictSlot):
                with torch.no_grad():
                    s.reinforce(tokens, self._logits)


def _share_projection(slots) -> None:
    """A verdict memory whose fixed projection ``R`` equals an episodic memory's stepped before it reads
    that slot's ``hn R^T`` (the shipped model's two memories share ``R``: one ``[B, d] x [d, F]`` product
    a token instead of two; the same operations, so the same bits)."""
    for i, v in enumerate(slots):
        if not isinstance(v, VerdictSlot):
            continue
        for e in slots[:i]:
            if (isinstance(e, EpisodicSlot) and e.mem.R.shape == v.mem.R.shape and e.mem.R.dtype == v.mem.R.dtype
                    and e.mem.d_model == v.mem.d_model and torch.equal(e.mem.R, v.mem.R)):
                e.shares_projection, v.projection = True, e
                break


__all__ = ["COMPILE_OPTIONS", "RECOMPILE_LIMIT", "Decoder", "default_active"]
