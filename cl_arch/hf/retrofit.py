"""Fast-weight memories added beside the attention of a pretrained ``transformers`` causal LM.

``retrofit(model, layers=[...], n_heads=..., head_k_dim=..., head_v_dim=..., **rule)`` builds one
:class:`~cl_arch.layers.FastWeightLayer` (from a :class:`~cl_arch.config.FastLayerConfig`) per
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

from ..config import FAST_LAYER_FIELDS, FastLayerConfig
from ..layers import FastWeightLayer
from ..model import PlasticTransformer
from ..state import AttnLayerState, FastLayerState, LayerState, ModelState, StepContext

# (path to the decoder blocks, attribute of a block's attention module) per supported family.
FAMILIES: Dict[str, Tuple[str, str]] = {
    "llama": ("model.layers", "self_attn"),
    "qwen2": ("model.layers", "self_attn"),
    "mistral": ("model.layers", "self_attn"),
    "gpt2": ("transformer.h", "attn"),
}
SIZE_FIELDS = ("d_model", "n_heads", "head_k_dim", "head_v_dim")
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

    def fast_layer(self) -> FastLayerConfig:
        return FastLayerConfig(**self.fast)

    @property
    def baseline_rho(self) -> float:
        return float(self.fast.get("baseline_rho", FastLayerConfig().baseline_rho))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RetrofitConfig":
        try:
            cfg = cls(family=d["family"], layers=[int(i) for i in d["layers"]], fast=dict(d["fast"]),
                      vocab_size=int(d["vocab_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad retrofit config {d!r}: {e!r}") from e
        cfg.fast_layer()  # validates
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


class _Call:
    """What one :meth:`RetrofitModel.forward` hands the hooked attention modules: the fast states
    going in, each memory's context, and the states coming out."""

    def __init__(self, states: Sequence[Optional[FastLayerState]], ctxs: Sequence[StepContext]):
        self.states, self.ctxs = list(states), list(ctxs)
        self.new: List[Optional[FastLayerState]] = [None] * len(self.states)


class RetrofitModel(nn.Module):
    """A ``transformers`` causal LM (``self.base``) with fast memories beside some attentions.

    ``logits, state = model(input_ids [B, T], state=None, modulation=None, return_state=True, lam=None)``,
    as :meth:`PlasticTransformer.forward`; see the module docstring for the state's layout. Build it
    with :func:`retrofit`. Calling ``self.base`` directly raises (its hooks need this model's call),
    except inside ``with model.base_only():``, where the added layers are skipped.
    """

    def __init__(self, base: nn.Module, config: RetrofitConfig):
        super().__init__()
        self.base = base
        self.config = config
        self.check_inputs = True
        blocks = decoder_blocks(base, config.family)
        self.n_blocks = len(blocks)
        fcfg = config.fast_layer()
        self.fast = nn.ModuleDict({str(i): FastWeightLayer(fcfg, layer_idx=i) for i in config.layers})
        self._call: Optional[_Call] = None
        self._skip = False
        self._fp_cache: Optional[Tuple[Any, str]] = None
        attn_name = FAMILIES[config.family][1]
        self._handles = [getattr(blocks[i], attn_name).register_forward_hook(self._hook(j), with_kwargs=True)
                         for j, i in enumerate(config.layers)]

    # ------------------------------------------------------------------ the hook
    def _hook(self, j: int):
        def hook(module, args, kwargs, output):
            if self._skip:
                return output
            call = self._call
            if call is None:
                raise RuntimeError("this attention module carries a retrofitted fast memory: call the RetrofitModel "
                                   "(model(ids, state=...)), not its base (or use `with model.base_only():`)")
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            layer = self.fast_layers()[j]
            dt = layer.o_proj.weight.dtype
            y, new = layer(x.to(dt), call.states[j], call.ctxs[j])
            call.new[j] = new
            if isinstance(output, tuple):
                return (output[0] + y.to(output[0].dtype),) + tuple(output[1:])
            return output + y.to(output.dtype)
        return hook

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

    def fast_layers(self) -> List[FastWeightLayer]:
        """The added memories, in the order of ``config.layers`` (and of their state slots)."""
        return [self.fast[str(i)] for i in self.config.layers]

    def memories(self) -> List[Optional[FastWeightLayer]]:
        """One entry per state slot: None for each block's KV cache, then the added memories."""
        return [None] * self.n_blocks + self.fast_layers()

    # The state helpers only read memories() and fast_layers(): PlasticTransformer's apply as they are.
    def init_state(self, batch_size: int, P: Optional[Sequence[Optional[torch.Tensor]]] = None) -> ModelState:
        """Start-of-episode state for ``batch_size`` streams; ``P``: one ``[B, H, K, V]`` /
        ``[H, K, V]`` / None per added memory (as :meth:`PlasticTransformer.init_state`)."""
        return PlasticTransformer.init_state(self, batch_size, P)

    def materialize_state(self, state: ModelState, batch_size: Optional[int] = None) -> ModelState:
        """``S = W0 + P``, ``E = 0``, conv caches 0 made explicit (as :meth:`PlasticTransformer.materialize_state`)."""
        return PlasticTransformer.materialize_state(self, state, batch_size)

    def base_fingerprint(self) -> str:
        """16 hex of sha256 over the base model's class and every tensor of its ``state_dict``
        (name, dtype, shape, bytes). Cached until a base parameter changes in place (distill)."""
        key = tuple((id(p), p._version) for p in self.base.parameters())
        if self._fp_cache is not None and self._fp_cache[0] == key:
            return self._fp_cache[1]
        h = hashlib.sha256(type(self.base).__name__.encode())
        for name, t in sorted(self.base.state_dict().items()):
            _hash_tensor(h, name, t)
        fp = h.hexdigest()[:16]
        self._fp_cache = (key, fp)
        return fp

    def fingerprint(self) -> str:
        """16 hex of sha256 over the retrofit config, the base fingerprint and the added tensors."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        h.update(self.base_fingerprint().encode())
        for name, t in sorted(self.fast.state_dict().items()):
            _hash_tensor(h, name, t)
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ forward
    def _lams(self, lam) -> List[Optional[float]]:
        n = len(self.config.layers)
        lams = [lam] * n if lam is None or isinstance(lam, (int, float)) else list(lam)
        if len(lams) != n:
            raise ValueError(f"lam must be a float or have one entry per fast layer ({n}), got {len(lams)}")
        for v in lams:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ValueError(f"lam must be in [0, 1], got {v!r}")
        return lams

    def _check(self, input_ids, state, modulation) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 or \
                input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            what = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] integer tensor with T >= 1, got {what}")
        if self.check_inputs and input_ids.numel():
            lo, hi = torch.stack(list(torch.aminmax(input_ids))).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")
        B, T = input_ids.shape
        if state is not None:
            if not isinstance(state, ModelState):
                raise ValueError(f"state must be a ModelState, got {type(state).__name__}")
            mems = self.memories()
            if len(state.layers) != len(mems):
                raise ValueError(f"state has {len(state.layers)} slots, this retrofit {len(mems)} "
                                 f"({self.n_blocks} KV caches + {len(self.config.layers)} fast memories)")
            for i, (s, m) in enumerate(zip(state.layers, mems)):
                want = FastLayerState if m is not None else AttnLayerState
                if not isinstance(s, want):
                    raise ValueError(f"state.layers[{i}] is {type(s).__name__}, slot {i} needs {want.__name__}")
            if state.batch_size is not None and state.batch_size != B:
                raise ValueError(f"state batch size {state.batch_size} does not match input_ids batch size {B}")
        if modulation is not None:
            if not isinstance(modulation, torch.Tensor) or tuple(modulation.shape) != (B, T):
                raise ValueError(f"modulation must be a [B, T] = {(B, T)} tensor")
            if self.check_inputs and bool((~torch.isfinite(modulation) | (modulation < 0) | (modulation > 1)).any()):
                raise ValueError("modulation must be finite and in [0, 1]")

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
        """
        Args:
            input_ids: ``[B, T]`` ids in ``[0, vocab_size)``.
            state: from a previous call (continues the stream: KV caches and fast states), from
                :meth:`init_state`, or None (fresh episode without P).
            modulation: ``[B, T]`` in [0, 1] scaling every added memory's write strength.
            return_state: False skips the KV cache and the fast final states (training).
            lam: trace-decay override (a float, or one entry per added memory; None: own).

        Returns:
            ``logits [B, T, vocab_size]`` and the new :class:`ModelState` (None if not requested).
        """
        self._check(input_ids, state, modulation)
        lams = self._lams(lam)
        B, T = input_ids.shape
        position = state.position if state is not None else 0
        kv = list(state.layers[:self.n_blocks]) if state is not None else [AttnLayerState()] * self.n_blocks
        fast_in = list(state.layers[self.n_blocks:]) if state is not None else [None] * len(lams)
        ctx = StepContext(position=position, modulation=modulation, need_state=return_state)
        call = _Call(fast_in, [dataclasses.replace(ctx, lam=v) for v in lams])
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
        logits = out.logits
        if not return_state:
            return logits, None
        new_cache = out.cache if getattr(out, "cache", None) is not None else cache
        layers: List[LayerState] = []
        for i in range(self.n_blocks):
            lyr = new_cache.layers[i] if i < len(new_cache.layers) else None
            k = getattr(lyr, "keys", None)
            layers.append(AttnLayerState(k, lyr.values) if k is not None and k.numel() else AttnLayerState())
        layers.extend(call.new)
        return logits, ModelState(layers, position + T)


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def retrofit(model: nn.Module, layers: Optional[Sequence[int]] = None, n_heads: int = 4,
             head_k_dim: Optional[int] = None, head_v_dim: Optional[int] = None, **rule: Any) -> RetrofitModel:
    """Add a fast-weight memory beside the attention of decoder blocks ``layers`` of ``model``.

    Args:
        model: a ``transformers`` causal LM of a family in :data:`FAMILIES` (e.g. ``LlamaForCausalLM``,
            ``Qwen2ForCausalLM``, ``MistralForCausalLM``, ``GPT2LMHeadModel``). It becomes
            ``result.base``; its modules and weights are not changed.
        layers: indices of the decoder blocks to extend (None: every block).
        n_heads, head_k_dim, head_v_dim: each memory is ``n_heads`` matrices ``[K, V]``; K and V default
            to ``min(64, hidden_size // n_heads)``.
        **rule: any other :class:`~cl_arch.config.FastLayerConfig` field (``lam, gamma, eta_s, eta_r,
            commit_clip, baseline_rho, rule, conv_size, fast_rest, decay_init, learn_plasticity, ...``).

    Returns:
        A :class:`RetrofitModel` on the base's device, added layers in float32 (the hook casts),
        output projections zero: its logits equal the base model's.

    Raises:
        ValueError: an unsupported model, a layer index out of range or repeated, an unknown rule
            setting, or a bad value (the message names the FastLayerConfig field).
    """
    if isinstance(model, RetrofitModel):
        raise ValueError("model is already a RetrofitModel; retrofit its .base with all the layers you want at once")
    family = model_family(model)
    n_blocks = len(decoder_blocks(model, family))
    layers = list(range(n_blocks)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one decoder block to retrofit")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_blocks]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct block indices in [0, {n_blocks}), got {layers}")
    unknown = sorted(set(rule) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"unknown retrofit settings {unknown}; known: {list(RULE_FIELDS)}")
    d_model = int(model.config.hidden_size)
    default_dim = max(1, min(64, d_model // max(1, n_heads if isinstance(n_heads, int) else 1)))
    fast = FastLayerConfig(d_model=d_model, n_heads=n_heads, head_k_dim=head_k_dim or default_dim,
                           head_v_dim=head_v_dim or default_dim, **rule)
    cfg = RetrofitConfig(family=family, layers=sorted(layers), fast=fast.to_dict(),
                         vocab_size=int(model.config.vocab_size))
    out = RetrofitModel(model, cfg)
    with torch.no_grad():
        for layer in out.fast_layers():
            layer.o_proj.weight.zero_()  # logits unchanged at insertion: the read adds exactly 0
    return out.to(out.device)
