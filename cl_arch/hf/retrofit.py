"""Fast-weight memories added beside the attention of a pretrained ``transformers`` causal LM.

``retrofit(model, layers=[...], n_heads=..., head_k_dim=..., head_v_dim=..., **rule)`` builds one
:class:`~cl_arch.memory.FastWeightLayer` (from a :class:`~cl_arch.config.FastLayerConfig`) per
chosen decoder block and hooks it onto that block's attention module: the block then computes
``x + attn(norm(x)) + fast(norm(x))``, the fast layer reading the same normalised input as the
attention. Its output projection starts at zero, so the logits are unchanged at insertion.

Why hooks: the base model's modules, parameter names and ``state_dict`` stay exactly as they were
(its checkpoint still loads into it, and a saved retrofit needs only the added tensors); the same
mechanism fits every family whose blocks call an attention module on the normalised input
(Llama / Qwen2 / Mistral: ``model.layers[i].self_attn``; GPT-2: ``transformer.h[i].attn``).

The result, :class:`RetrofitModel`, satisfies :class:`cl_arch.protocols.PlasticModel`: its state is
one :class:`~cl_arch.state.AttnLayerState` per decoder block (the base model's KV cache, converted
to and from a ``DynamicCache`` at every call) followed by one
:class:`~cl_arch.state.FastLayerState` per added memory, in :meth:`RetrofitModel.fast_layers` order.

``retrofit(..., episodic_heads=1)`` (or :func:`add_episodic_memory`) also adds an
:class:`~cl_arch.memory.EpisodicMemory` (docs/design.md, "The episodic memory") after the base's
final norm (Llama / Qwen2 / Mistral ``model.model.norm``, GPT-2 ``transformer.ln_f``, read with a
forward hook): it writes ``phi(h_{t-1}) -> x_t`` and adds its read to the logits, values read back
through the base's output head when ``episodic_values="embed"``. Its read scale starts at 0, so the
logits are still the base's at insertion. It is the last of :meth:`RetrofitModel.fast_layers`, and
its commit is the state commit (``P <- S_T - W0``): the next episode or session starts where this
one ended. Why add it: the in-block memories' trace commit did not make a carried ``P`` useful on
text (README, "Retrofit an existing model"), and on the PlasticTransformer the episodic memory's did.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..commit import commit_episode
from ..memory import FAST_LAYER_FIELDS, EpisodicConfig, EpisodicMemory, FastLayerConfig, FastWeightLayer, OutputContext
from ..model import PlasticTransformer
from ..state import AttnLayerState, FastLayerState, LayerState, ModelState, StepContext, check_step_inputs

# (path to the decoder blocks, attribute of a block's attention module) per supported family.
FAMILIES: Dict[str, Tuple[str, str]] = {
    "llama": ("model.layers", "self_attn"),
    "qwen2": ("model.layers", "self_attn"),
    "mistral": ("model.layers", "self_attn"),
    "gpt2": ("transformer.h", "attn"),
}
# The final norm whose output (the hidden state the output head reads) the episodic memory keys on.
FINAL_NORMS: Dict[str, str] = {"llama": "model.norm", "qwen2": "model.norm", "mistral": "model.norm",
                               "gpt2": "transformer.ln_f"}
SIZE_FIELDS = ("d_model", "n_heads", "head_k_dim", "head_v_dim")
# EpisodicMemory settings a retrofit accepts (EpisodicConfig's fields).
EPISODIC_FIELDS = ("heads", "features", "values", "threshold", "beta", "scale", "span", "seed")
# Above this vocabulary a one-hot value state [F, vocab] is impractical (2048 x 32k floats = 256 MB a head):
# the default value kind is then "embed" (V = d_model, read back through the output head).
ONEHOT_MAX_VOCAB = 4096
RULE_FIELDS = tuple(f for f in FAST_LAYER_FIELDS if f not in SIZE_FIELDS)


@dataclass
class RetrofitConfig:
    """What a retrofit added: the decoder blocks given a fast memory and that memory's config.

    ``vocab_size`` and ``baseline_rho`` are what sessions and consolidation read of a model config.
    """

    family: str
    layers: List[int]
    fast: Dict[str, Any]
    vocab_size: int
    # EpisodicMemory settings (EPISODIC_FIELDS plus d_model) or None: no episodic memory.
    episodic: Optional[Dict[str, Any]] = None

    def fast_layer(self) -> FastLayerConfig:
        return FastLayerConfig(**self.fast)

    def episodic_config(self) -> Optional[EpisodicConfig]:
        """The :class:`EpisodicConfig` of the episodic memory, or None."""
        if self.episodic is None:
            return None
        return EpisodicConfig(**{k: v for k, v in self.episodic.items() if k != "d_model"})

    def build_episodic(self) -> Optional[EpisodicMemory]:
        """The episodic memory (its rule settings: the block memories' ``FastLayerConfig``), or None."""
        ecfg = self.episodic_config()
        if ecfg is None:
            return None
        # PlasticConfig defaults for the plasticity settings the state commit does not read (lam,
        # gamma, eta), as the memory was built before its config was its own
        rule = dataclasses.replace(FastLayerConfig(), **{k: getattr(self.fast_layer(), k) for k in
                                                         ("chunk_size", "recurrent_threshold", "baseline_rho")})
        return EpisodicMemory(ecfg, int(self.episodic["d_model"]), self.vocab_size, rule)

    @property
    def baseline_rho(self) -> float:
        return float(self.fast.get("baseline_rho", FastLayerConfig().baseline_rho))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["episodic"] is None:
            del d["episodic"]  # a retrofit without one keeps the fingerprint it had before the field existed
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RetrofitConfig":
        try:
            ep = d.get("episodic")
            cfg = cls(family=d["family"], layers=[int(i) for i in d["layers"]], fast=dict(d["fast"]),
                      vocab_size=int(d["vocab_size"]), episodic=None if ep is None else dict(ep))
            cfg.fast_layer()  # validates
            cfg.episodic_config()
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad retrofit config {d!r}: {e!r}") from e
        return cfg


def model_family(model: nn.Module) -> str:
    """The supported family of a ``transformers`` causal LM (``config.model_type``).

    Raises:
        ValueError: not a ``transformers`` model, or a family retrofit does not know.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in FAMILIES:
        raise ValueError(f"retrofit supports transformers causal LMs of the families {sorted(FAMILIES)}; "
                         f"got {type(model).__name__} (model_type {mt!r})")
    return mt


def decoder_blocks(model: nn.Module, family: str) -> List[nn.Module]:
    """The decoder blocks of ``model`` (``model.layers`` or ``transformer.h``)."""
    obj = model
    for part in FAMILIES[family][0].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{type(model).__name__} has no {FAMILIES[family][0]}: is it a *ForCausalLM model?")
    return list(obj)


def final_norm(model: nn.Module, family: str) -> nn.Module:
    """The norm whose output the base's output head reads (:data:`FINAL_NORMS`)."""
    obj = model
    for part in FINAL_NORMS[family].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{type(model).__name__} has no {FINAL_NORMS[family]}: is it a *ForCausalLM model?")
    return obj


def episodic_settings(d_model: int, vocab_size: int, heads: int = 1, features: int = 2048,
                      values: Optional[str] = None, threshold: float = 1.5, beta: float = 0.5, scale: float = 0.0,
                      span: float = 1e5, seed: int = 0) -> Dict[str, Any]:
    """The ``RetrofitConfig.episodic`` dict, validated (an :class:`EpisodicConfig` is built from it).

    ``values=None`` picks ``"onehot"`` (``V = vocab_size``) up to :data:`ONEHOT_MAX_VOCAB` tokens and
    ``"embed"`` (``V = d_model``) above. ``scale`` is the initial read scale: 0 (the default) keeps the
    logits exactly the base's until the settings are learned (:func:`cl_arch.train.finetune_hf.train_episodic_hf`).
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"episodic_heads must be an integer >= 1 to add an episodic memory, got {heads!r}")
    if values is None:
        values = "onehot" if vocab_size <= ONEHOT_MAX_VOCAB else "embed"
    e = {"d_model": int(d_model), "heads": heads, "features": features, "values": values,
         "threshold": float(threshold), "beta": float(beta), "scale": float(scale), "span": float(span), "seed": seed}
    try:
        EpisodicConfig(**{k: v for k, v in e.items() if k != "d_model"})
    except ValueError as err:
        raise ValueError(f"bad episodic memory settings: {err}") from err
    return e


class _Call:
    """What one :meth:`RetrofitModel.forward` hands the hooked attention modules: the fast states
    going in, each memory's context, and the states coming out."""

    def __init__(self, states: Sequence[Optional[FastLayerState]], ctxs: Sequence[StepContext]):
        self.states, self.ctxs = list(states), list(ctxs)
        self.new: List[Optional[FastLayerState]] = [None] * len(self.states)
        self.h: Optional[torch.Tensor] = None  # [B, T, d_model] output of the final norm (episodic memory's input)

    def block(self, j: int, layer: FastWeightLayer, x: torch.Tensor) -> torch.Tensor:
        """The ``j``-th block memory's output for its attention's input ``x [B, T, d_model]``."""
        y, self.new[j] = layer(x, self.states[j], self.ctxs[j])
        return y


class RetrofitModel(nn.Module):
    """A ``transformers`` causal LM (``self.base``) with fast memories beside some attentions.

    ``logits, state = model(input_ids [B, T], state=None, modulation=None, return_state=True, lam=None)``,
    as :meth:`PlasticTransformer.forward`; see the module docstring for the state's layout. Build it
    with :func:`retrofit`. Calling ``self.base`` directly raises (its hooks need this model's call),
    except inside ``with model.base_only():``, where the added layers are skipped; :meth:`unload`
    removes the hooks for good.
    """

    def __init__(self, base: nn.Module, config: RetrofitConfig, fast: Optional[nn.ModuleDict] = None):
        """Hook the memories of ``config`` onto ``base``.

        Args:
            fast: the added memories already built (and loaded) with :func:`build_fast`; None builds new ones.

        Raises:
            ValueError: ``base`` does not fit ``config`` (:func:`check_base`), including a base that
                already carries a retrofit. Nothing is attached to ``base`` then.
        """
        super().__init__()
        blocks = check_base(base, config)
        self.base = base
        self.config = config
        self.check_inputs = True
        self.n_blocks = len(blocks)
        # The episodic memory lives in the same ModuleDict (key "episodic"), so saving, loading and the
        # fingerprint, which read self.fast.state_dict(), carry its R buffer and settings with no special case.
        self.fast = build_fast(config) if fast is None else fast
        self._call: Optional[_Call] = None
        self._skip = False
        self._handles: List[Any] = []
        self._unloaded = True
        self._attach()

    def _attach(self) -> None:
        attn_name = FAMILIES[self.config.family][1]
        blocks = decoder_blocks(self.base, self.config.family)
        try:
            for j, i in enumerate(self.config.layers):
                self._handles.append(getattr(blocks[i], attn_name).register_forward_hook(self._hook(j),
                                                                                         with_kwargs=True))
            if self.episodic is not None:
                self._handles.append(final_norm(self.base, self.config.family).register_forward_hook(
                    _mark(self._norm_hook)))
        except BaseException:
            self._detach()  # half a retrofit would make the caller's base raise on every call
            raise
        self._unloaded = False

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unloaded = True

    def unload(self) -> nn.Module:
        """Remove this retrofit's hooks and give back the base model, exactly as it was before
        :func:`retrofit` (its weights are not touched). This model cannot be called afterwards."""
        self._detach()
        return self.base

    # ------------------------------------------------------------------ the hook
    def _hook(self, j: int):
        @_mark
        def hook(module, args, kwargs, output):
            if self._skip:
                return output
            call = self._call
            if call is None:
                raise RuntimeError("this attention module carries a retrofitted fast memory: call the RetrofitModel "
                                   "(model(ids, state=...)), not its base (or use `with model.base_only():`)")
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            layer = self.block_layers()[j]
            y = call.block(j, layer, x.to(layer.o_proj.weight.dtype))
            if isinstance(output, tuple):
                return (output[0] + y.to(output[0].dtype),) + tuple(output[1:])
            return output + y.to(output.dtype)
        return hook

    def _norm_hook(self, module, args, output):
        # Only records the final hidden states; the read is added to the logits in forward().
        if not self._skip and self._call is not None:
            self._call.h = output[0] if isinstance(output, tuple) else output
        return None

    @contextlib.contextmanager
    def base_only(self):
        """Run ``self.base`` as it was before the retrofit (the added layers skipped)."""
        self._skip = True
        try:
            yield self.base
        finally:
            self._skip = False

    # ------------------------------------------------------------------ the PlasticModel protocol
    @property
    def device(self) -> torch.device:
        """Where the base model's weights live (and where inputs must go)."""
        return next(self.base.parameters()).device

    @property
    def episodic(self) -> Optional[EpisodicMemory]:
        """The episodic memory after the final norm, or None."""
        return self.fast["episodic"] if "episodic" in self.fast else None

    def block_layers(self) -> List[FastWeightLayer]:
        """The memories beside the attentions, in the order of ``config.layers``."""
        return [self.fast[str(i)] for i in self.config.layers]

    def fast_layers(self) -> List[Union[FastWeightLayer, EpisodicMemory]]:
        """The added memories in state order: the block memories (``config.layers`` order), then
        the episodic memory if there is one."""
        ep = self.episodic
        return self.block_layers() + ([ep] if ep is not None else [])

    def memories(self) -> List[Optional[FastWeightLayer]]:
        """One entry per state slot: None for each block's KV cache, then the added memories."""
        return [None] * self.n_blocks + self.fast_layers()

    def fast_layer_names(self) -> List[str]:
        """A name per :meth:`fast_layers` entry: ``blocks.<i>`` per block memory, ``"episodic"``."""
        return [f"blocks.{i}" for i in self.config.layers] + (["episodic"] if self.episodic is not None else [])

    def memory_states(self, state: ModelState) -> Dict[str, FastLayerState]:
        """The fast slots of ``state`` by memory name (:meth:`fast_layer_names`)."""
        return PlasticTransformer.memory_states(self, state)

    # ------------------------------------------------------------------ surgery
    def add_memory(self, cfg: EpisodicConfig) -> EpisodicMemory:
        """Add the episodic memory after the base's final norm, in place (the one output memory a
        retrofit carries); the block memories and the base are unchanged. The memory is built from
        ``cfg`` and the block memories' rule settings, on the base's device, float32; the
        retrofit config records it, so :func:`save_retrofit` / :func:`load_retrofit` carry it. States
        from before the call have one slot too few.

        Raises:
            ValueError: ``cfg`` is not an :class:`EpisodicConfig`, or the model already has one.
        """
        if not isinstance(cfg, EpisodicConfig):
            raise ValueError(f"a retrofit's output memory is an EpisodicConfig, got {type(cfg).__name__}")
        if self.episodic is not None:
            raise ValueError("this retrofit already has an episodic memory")
        if cfg.name != "episodic":
            raise ValueError(f"a retrofit's episodic memory is named 'episodic', got EpisodicConfig.name={cfg.name!r}")
        d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in EPISODIC_FIELDS}
        if cfg.commit_span != EpisodicConfig.commit_span:  # only when set: older retrofits hash without the key
            d["commit_span"] = cfg.commit_span
        config = dataclasses.replace(self.config, episodic={"d_model": int(self.base.config.hidden_size), **d})
        memory = config.build_episodic().to(self.device)
        self._detach()
        self.config = config
        self.fast["episodic"] = memory
        try:
            self._attach()
        except BaseException:
            del self.fast["episodic"]
            self.config = dataclasses.replace(config, episodic=None)
            self._attach()
            raise
        return memory

    def remove_memory(self, name: str) -> EpisodicMemory:
        """Remove the episodic memory (``name == "episodic"``), in place; returns it."""
        if name != "episodic" or self.episodic is None:
            raise KeyError(f"no memory named {name!r}; this retrofit's: {['episodic'] if self.episodic else []}")
        self._detach()
        memory = self.fast["episodic"]
        del self.fast["episodic"]
        self.config = dataclasses.replace(self.config, episodic=None)
        self._attach()
        return memory

    # The state helpers only read memories() and fast_layers(): PlasticTransformer's apply as they are.
    def init_state(self, batch_size: int, P: Optional[Sequence[Optional[torch.Tensor]]] = None) -> ModelState:
        """Start-of-episode state for ``batch_size`` streams; ``P``: one ``[B, H, K, V]`` /
        ``[H, K, V]`` / None per added memory (as :meth:`PlasticTransformer.init_state`)."""
        return PlasticTransformer.init_state(self, batch_size, P)

    def materialize_state(self, state: ModelState, batch_size: Optional[int] = None) -> ModelState:
        """``S = W0 + P``, ``E = 0``, conv caches 0 made explicit (as :meth:`PlasticTransformer.materialize_state`)."""
        return PlasticTransformer.materialize_state(self, state, batch_size)

    def commit(self, state, P=None, reward=None, baseline=None, **kwargs):
        """The episode-end commit of the added memories (:func:`cl_arch.commit.commit_episode`)."""
        return commit_episode(self, state, P, reward, baseline, **kwargs)

    def base_fingerprint(self) -> str:
        """16 hex of sha256 over the base model's class and every tensor of its ``state_dict``
        (:func:`base_fingerprint`), computed afresh on every call."""
        return base_fingerprint(self.base)

    def fingerprint(self) -> str:
        """16 hex of sha256 over the retrofit config, the base fingerprint and the added tensors."""
        return retrofit_fingerprint(self.config, self.base_fingerprint(), self.fast)

    # ------------------------------------------------------------------ decoding
    def decoder_unsupported(self) -> Optional[str]:
        """Why :meth:`make_decoder` cannot decode this model (a sentence), or None when it can."""
        from .decoder import retrofit_decoder_unsupported

        return retrofit_decoder_unsupported(self)

    def make_decoder(self, batch_size: int, max_len: Optional[int] = None, compile: Union[str, bool] = "auto",
                     lam=None, n_active: Optional[int] = None):
        """A :class:`~cl_arch.hf.decoder.RetrofitDecoder` of this model for ``batch_size`` streams (what
        :class:`~cl_arch.Session` decodes through; ``max_len``: its KV buffer's positions)."""
        from .decoder import RetrofitDecoder

        return RetrofitDecoder(self, batch_size, max_len=max_len, compile=compile, lam=lam, n_active=n_active)

    # ------------------------------------------------------------------ forward
    def _lams(self, lam) -> List[Optional[float]]:
        n = len(self.fast_layers())
        lams = [lam] * n if lam is None or isinstance(lam, (int, float)) else list(lam)
        if len(lams) != n:
            raise ValueError(f"lam must be a float or have one entry per fast layer ({n}), got {len(lams)}")
        for v in lams:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ValueError(f"lam must be in [0, 1], got {v!r}")
        return lams

    def _check(self, input_ids, state, modulation) -> None:
        episodic = " + the episodic memory" if self.episodic is not None else ""
        check_step_inputs(input_ids, state, modulation, vocab_size=self.config.vocab_size, memories=self.memories(),
                          check_values=self.check_inputs,
                          layout=f"{self.n_blocks} KV caches + {len(self.config.layers)} fast memories{episodic}")

    def _kv_cache(self, kv: Sequence[AttnLayerState]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.base.config)
        for i, s in enumerate(kv):
            if s.k is not None:
                if i >= len(cache.layers):
                    cache.update(s.k, s.v, i)
                else:
                    cache.layers[i].update(s.k, s.v)
        return cache

    def forward(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                modulation: Optional[torch.Tensor] = None, return_state: bool = True,
                lam: Union[None, float, Sequence[Optional[float]]] = None
                ) -> Tuple[torch.Tensor, Optional[ModelState]]:
        """The protocol's call: :meth:`run`'s arguments (``input_ids [B, T]``, ``state``,
        ``modulation [B, T]``, ``return_state``, ``lam``) and result without the hidden states:
        ``logits [B, T, vocab_size]`` and the new :class:`ModelState` (None if not requested)."""
        logits, new_state, _ = self.run(input_ids, state, modulation, return_state, lam)
        return logits, new_state

    def run(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
            modulation: Optional[torch.Tensor] = None, return_state: bool = True,
            lam: Union[None, float, Sequence[Optional[float]]] = None, episodic: bool = True
            ) -> Tuple[torch.Tensor, Optional[ModelState], Optional[torch.Tensor]]:
        """
        Args:
            input_ids: ``[B, T]`` ids in ``[0, vocab_size)``.
            state: from a previous call (continues the stream: KV caches and fast states), from
                :meth:`init_state`, or None (fresh episode without P).
            modulation: ``[B, T]`` in [0, 1] scaling every added memory's write strength.
            return_state: False skips the KV cache and the fast final states (training).
            lam: trace-decay override (a float, or one entry per added memory; None: own).
            episodic: False skips the episodic memory (its read is not added and its state slot is
                passed through unchanged): the inputs it sees, computed once to learn its settings
                (:func:`cl_arch.train.finetune_hf.train_episodic_hf`).

        Returns:
            ``logits [B, T, vocab_size]``, the new :class:`ModelState` (None if not requested) and
            the final hidden states ``h [B, T, d_model]`` (the final norm's output; None without an
            episodic memory, whose hook is what records them).
        """
        if self._unloaded:
            raise RuntimeError("this RetrofitModel was unloaded (its hooks removed from the base): retrofit the "
                               "base again, or load_retrofit() it")
        self._check(input_ids, state, modulation)
        lams = self._lams(lam)
        B, T = input_ids.shape
        position = state.position if state is not None else 0
        kv = list(state.layers[:self.n_blocks]) if state is not None else [AttnLayerState()] * self.n_blocks
        fast_in = list(state.layers[self.n_blocks:]) if state is not None else [None] * len(lams)
        ctx = StepContext(position=position, modulation=modulation, need_state=return_state)
        ctxs = [dataclasses.replace(ctx, lam=v) for v in lams]
        ep = self.episodic
        n_block = len(self.config.layers)
        call = _Call(fast_in[:n_block], ctxs[:n_block])
        has_kv = any(s.k is not None for s in kv)
        cache = self._kv_cache(kv) if (has_kv or return_state) else None
        pos_ids = torch.arange(position, position + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        if self._call is not None:
            raise RuntimeError("RetrofitModel.forward is not re-entrant (a call is already running)")
        self._call = call
        try:
            out = self.base(input_ids=input_ids, cache=cache, use_cache=cache is not None, position_ids=pos_ids)
        finally:
            self._call = None
        logits, h = out.logits, call.h
        ep_new: List[Optional[FastLayerState]] = []
        if ep is not None:
            if h is None:
                raise RuntimeError("the final-norm hook did not fire: the episodic memory has no hidden states to read")
            if episodic:
                # embed/head: the base's own input and output embeddings (values and their read-back).
                out_ctx = OutputContext(h, input_ids, self.base.get_input_embeddings(),
                                        self.base.get_output_embeddings(), logits=logits)
                read, s_ep = ep(out_ctx, fast_in[n_block], ctxs[n_block])
                logits = logits + read.to(logits.dtype)
            else:
                s_ep = fast_in[n_block] if fast_in[n_block] is not None else FastLayerState()
            ep_new.append(s_ep)
        if not return_state:
            return logits, None, h
        new_cache = out.cache if getattr(out, "cache", None) is not None else cache
        layers: List[LayerState] = []
        for i in range(self.n_blocks):
            lyr = new_cache.layers[i] if i < len(new_cache.layers) else None
            k = getattr(lyr, "keys", None)
            layers.append(AttnLayerState(k, lyr.values) if k is not None and k.numel() else AttnLayerState())
        layers.extend(call.new)
        layers.extend(ep_new)
        return logits, ModelState(layers, position + T), h


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy


def base_fingerprint(base: nn.Module) -> str:
    """16 hex of sha256 over ``base``'s class and every tensor of its ``state_dict`` (name, dtype,
    shape, bytes).

    Why no cache: an edit through ``p.data`` (``p.data.add_(1)``) bumps no version counter and keeps
    ``data_ptr``, so no key short of the bytes themselves notices it, and sessions, saved retrofits and
    ``undo`` trust this value. Hashing runs at memory-copy plus sha256 speed (docs/design.md, the
    retrofit section, gives the measured cost).
    """
    h = hashlib.sha256(type(base).__name__.encode())
    for name, t in sorted(base.state_dict().items()):
        _hash_tensor(h, name, t)
    return h.hexdigest()[:16]


def retrofit_fingerprint(config: RetrofitConfig, base_fp: str, fast: nn.Module) -> str:
    """16 hex of sha256 over the retrofit config, the base fingerprint and the added tensors
    (``fast.state_dict()``): :meth:`RetrofitModel.fingerprint` of a retrofit not yet attached."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(base_fp.encode())
    for name, t in sorted(fast.state_dict().items()):
        _hash_tensor(h, name, t)
    return h.hexdigest()[:16]


def _mark(hook):
    # A retrofit's hooks carry this mark so that a second retrofit of the same base is seen and refused.
    def marked(*args, **kwargs):
        return hook(*args, **kwargs)
    marked._cl_arch_retrofit = True
    return marked


def is_retrofitted(base: nn.Module) -> bool:
    """Whether some module of ``base`` carries a hook of a live :class:`RetrofitModel`."""
    return any(getattr(fn, "_cl_arch_retrofit", False) for m in base.modules() for fn in m._forward_hooks.values())


def build_fast(config: RetrofitConfig) -> nn.ModuleDict:
    """The memories a retrofit adds, not yet attached to any base: one :class:`FastWeightLayer` per
    block of ``config.layers`` (key ``str(i)``), then the :class:`EpisodicMemory` (key ``"episodic"``)
    if the config has one. Float32, on the CPU."""
    fcfg = config.fast_layer()
    fast = nn.ModuleDict({str(i): FastWeightLayer(fcfg, layer_idx=i) for i in config.layers})
    ep = config.build_episodic()
    if ep is not None:
        fast["episodic"] = ep
    return fast


def check_base(base: nn.Module, config: RetrofitConfig) -> List[nn.Module]:
    """The decoder blocks of ``base`` once it is known to take the memories of ``config``.

    Raises:
        ValueError: ``base`` is of another family, lacks a block of ``config.layers``, has another
            hidden size or vocabulary, or already carries a retrofit.
    """
    family = model_family(base)
    if family != config.family:
        raise ValueError(f"the retrofit is for a {config.family} model, the base is {family} ({type(base).__name__})")
    blocks = decoder_blocks(base, family)
    missing = [i for i in config.layers if not 0 <= i < len(blocks)]
    if missing:
        raise ValueError(f"the retrofit hooks block {missing[0]} (layers {config.layers}) but the base has "
                         f"{len(blocks)} decoder blocks")
    hidden, vocab = int(base.config.hidden_size), int(base.config.vocab_size)
    d_model = int(config.fast.get("d_model", hidden))
    ep_d = int(config.episodic["d_model"]) if config.episodic is not None else hidden
    if d_model != hidden or ep_d != hidden:
        raise ValueError(f"the retrofit's memories read d_model {d_model if d_model != hidden else ep_d}, "
                         f"the base's hidden size is {hidden}")
    if config.vocab_size != vocab:
        raise ValueError(f"the retrofit is for a vocabulary of {config.vocab_size} tokens, the base has {vocab}")
    _refuse_retrofitted(base)
    return blocks


def _refuse_retrofitted(base: nn.Module) -> None:
    # Two retrofits' hooks on one base would each add a memory the other's call does not expect.
    if is_retrofitted(base):
        raise ValueError(f"this {type(base).__name__} already carries a retrofit (fast-memory hooks on its modules): "
                         "call .unload() on the RetrofitModel that holds it first, or keep using that one "
                         "(retrofit a base once, with all the layers you want)")


def add_episodic_memory(model: RetrofitModel, heads: int = 1, features: int = 2048, values: Optional[str] = None,
                        **settings: Any) -> RetrofitModel:
    """Shortcut for ``model.add_memory(EpisodicConfig(...))`` with the retrofit's defaults
    (:func:`episodic_settings`: ``values`` by vocabulary size, read scale 0 so the logits stay the
    base's); returns ``model``, changed in place. ``settings``: ``threshold, beta, scale, span, seed``.

    Raises:
        ValueError: the model already has one; bad settings.
    """
    if not isinstance(model, RetrofitModel):
        raise ValueError(f"add_episodic_memory takes a RetrofitModel, got {type(model).__name__}")
    unknown = sorted(set(settings) - set(EPISODIC_FIELDS))
    if unknown:
        raise ValueError(f"unknown episodic memory settings {unknown}; known: {list(EPISODIC_FIELDS)}")
    e = episodic_settings(int(model.base.config.hidden_size), model.config.vocab_size, heads, features, values,
                          **settings)
    model.add_memory(EpisodicConfig(**{k: v for k, v in e.items() if k != "d_model"}))
    return model


def retrofit(model: nn.Module, layers: Optional[Sequence[int]] = None, n_heads: int = 4,
             head_k_dim: Optional[int] = None, head_v_dim: Optional[int] = None, episodic_heads: int = 0,
             episodic_features: int = 2048, episodic_values: Optional[str] = None, **rule: Any) -> RetrofitModel:
    """Add a fast-weight memory beside the attention of decoder blocks ``layers`` of ``model``
    (and with ``episodic_heads >= 1`` an episodic memory after its final norm).

    Args:
        model: a ``transformers`` causal LM of a family in :data:`FAMILIES` (e.g. ``LlamaForCausalLM``,
            ``Qwen2ForCausalLM``, ``MistralForCausalLM``, ``GPT2LMHeadModel``). It becomes
            ``result.base``; its modules and weights are not changed.
        layers: indices of the decoder blocks to extend (None: every block; ``layers=[]`` adds none,
            then ``episodic_heads`` must be >= 1).
        n_heads, head_k_dim, head_v_dim: each memory is ``n_heads`` matrices ``[K, V]``; K and V default
            to ``min(64, hidden_size // n_heads)``.
        episodic_heads: 0 (none) or the heads of an :class:`~cl_arch.memory.EpisodicMemory` of
            ``[episodic_features, V]`` matrices reading the final hidden states.
        episodic_values: ``"onehot"`` (``V = vocab_size``) or ``"embed"`` (``V = hidden_size``, read
            back through the output head); None: onehot up to :data:`ONEHOT_MAX_VOCAB` tokens.
        **rule: any other :class:`~cl_arch.config.FastLayerConfig` field (``lam, gamma, eta_s, eta_r,
            commit_clip, baseline_rho, rule, conv_size, fast_rest, decay_init, learn_plasticity, ...``),
            or ``episodic_threshold, episodic_beta, episodic_scale, episodic_span, episodic_seed``.

    Returns:
        A :class:`RetrofitModel` on the base's device, added layers in float32 (the hook casts),
        output projections and the episodic read scale zero: its logits equal the base model's.

    Raises:
        ValueError: an unsupported model, a layer index out of range or repeated, an unknown rule
            setting, or a bad value (the message names the FastLayerConfig field); a model that already
            carries a retrofit (:meth:`RetrofitModel.unload` the one it has first).
    """
    if isinstance(model, RetrofitModel):
        raise ValueError("model is already a RetrofitModel; retrofit its .base with all the layers you want at once")
    family = model_family(model)
    _refuse_retrofitted(model)  # before anything is built
    n_blocks = len(decoder_blocks(model, family))
    layers = list(range(n_blocks)) if layers is None else list(layers)
    if not layers and not episodic_heads:
        raise ValueError("layers is empty: name at least one decoder block to retrofit (or add an episodic memory)")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_blocks]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct block indices in [0, {n_blocks}), got {layers}")
    ep_kw = {k[len("episodic_"):]: rule.pop(k) for k in list(rule)
             if k.startswith("episodic_") and k[len("episodic_"):] in EPISODIC_FIELDS}
    unknown = sorted(set(rule) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"unknown retrofit settings {unknown}; known: {list(RULE_FIELDS)}")
    d_model = int(model.config.hidden_size)
    default_dim = max(1, min(64, d_model // max(1, n_heads if isinstance(n_heads, int) else 1)))
    fast = FastLayerConfig(d_model=d_model, n_heads=n_heads, head_k_dim=head_k_dim or default_dim,
                           head_v_dim=head_v_dim or default_dim, **rule)
    if isinstance(episodic_heads, bool) or not isinstance(episodic_heads, int) or episodic_heads < 0:
        raise ValueError(f"episodic_heads must be an integer >= 0, got {episodic_heads!r}")
    episodic = None
    if episodic_heads:
        episodic = episodic_settings(d_model, int(model.config.vocab_size), episodic_heads, episodic_features,
                                     episodic_values, **ep_kw)
    elif ep_kw:
        raise ValueError(f"episodic settings {sorted(ep_kw)} given with episodic_heads=0")
    cfg = RetrofitConfig(family=family, layers=sorted(layers), fast=fast.to_dict(),
                         vocab_size=int(model.config.vocab_size), episodic=episodic)
    out = RetrofitModel(model, cfg)
    with torch.no_grad():
        for layer in out.block_layers():
            layer.o_proj.weight.zero_()  # logits unchanged at insertion: the read adds exactly 0
    out.fast.to(out.device)  # the base stays where (and as) it is
    return out
