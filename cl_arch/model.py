"""PlasticTransformer: a decoder whose mixers are fast-weight memories and/or attention."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from cl_arch.kernels.checks import VALUE_CHECKS

from .commit import commit_episode
from .config import PlasticConfig, check_memories
from .io import atomic_write_many, recover, text_writer
from .layers import CausalSelfAttention, RMSNorm, SwiGLU
from .memory import FastWeightLayer, MemoryConfig, OutputContext, OutputMemory, PlasticMemory
from .memory.write import make_write
from .state import AttnLayerState, FastLayerState, LayerState, ModelState, StepContext, check_step_inputs

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# The names transformers reads in a checkpoint folder; `import cl_arch.hf` registers them with
# AutoConfig / AutoModelForCausalLM / AutoTokenizer (the core writes them as plain JSON).
HF_MODEL_TYPE = "cl_arch"
HF_ARCHITECTURE = "ClArchForCausalLM"
TOKENIZER_CLASS = "ClArchByteTokenizer"
# What W0 means. 2: the fast memory decays toward its resting state W0 + P (docs/design.md, "The rule").
# Checkpoints without it were trained when the memory decayed toward zero and W0 was only the
# episode's starting point: loading them under the new rule would silently change the model.
FAST_MEMORY_FORMAT = 2


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: PlasticConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        if self.layer_type == "fast":
            self.mixer = FastWeightLayer(config, layer_idx)
        else:
            self.mixer = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: Optional[LayerState], ctx: StepContext):
        """``x [B, T, d_model]``, this block's state, the call's context -> (``x``, new state)."""
        h, new_state = self.mixer(self.mixer_norm(x), state, ctx)
        x = x + self.dropout(h)
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_state


class PlasticTransformer(nn.Module):
    """Decoder-only language model with fast-weight layers (see docs/design.md).

    ``logits, state = model(input_ids, state)``; passing the returned state into the next call
    continues the same stream (fast weights, traces, conv and KV caches, position).

    The memories of ``config.memories`` (e.g. a :class:`~cl_arch.memory.ReadoutMemory` and an
    :class:`~cl_arch.memory.EpisodicMemory`) sit after the last norm, each an attribute under its
    name (``model.readout``), and add their reads to the logits; their states follow the blocks' in
    ``state.layers`` and they are the last of :meth:`fast_layers` (:meth:`output_memories`), so
    sessions and consolidation treat them like every other fast memory. :meth:`add_memory` and
    :meth:`remove_memory` change them on a trained model.
    """

    def __init__(self, config: PlasticConfig):
        super().__init__()
        self.config = config
        # Check the values of ids and modulation on every call (one host read each). Training loops
        # turn it off while they run: their inputs come from the data pipeline, not from a user.
        self.check_inputs = True
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        for mem in config.memories:
            self._register_memory(mem)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: projections that write into the residual stream start smaller, so the
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ------------------------------------------------------------------ introspection
    @property
    def device(self) -> torch.device:
        """Where the weights live (and where inputs must go)."""
        return self.embed.weight.device

    def output_memories(self) -> List[OutputMemory]:
        """The memories after the last block, in state order (``config.memories``' order)."""
        return [self._modules[m.name] for m in self.config.memories]

    def memory(self, name: str) -> Optional[OutputMemory]:
        """The output memory called ``name`` (``"readout"``, ``"episodic"``, ...), or None."""
        return self._modules[name] if any(m.name == name for m in self.config.memories) else None

    def fast_layer_names(self) -> List[str]:
        """A name per :meth:`fast_layers` entry: ``blocks.<i>`` for a block's fast mixer, the
        memory's name for an output memory."""
        blocks = [f"blocks.{i}" for i, b in enumerate(self.blocks) if isinstance(b.mixer, FastWeightLayer)]
        return blocks + [m.name for m in self.config.memories]

    def memory_states(self, state: ModelState) -> Dict[str, FastLayerState]:
        """The fast slots of ``state`` by memory name (:meth:`fast_layer_names`): e.g.
        ``model.memory_states(state)["readout"].P``, with no slot positions or type checks."""
        slots = state.fast()
        names = self.fast_layer_names()
        if len(slots) != len(names):
            raise ValueError(f"the state has {len(slots)} fast slots, the model {len(names)} memories {names}: a "
                             "state from before add_memory/remove_memory? start one with init_state")
        return dict(zip(names, slots))

    # ------------------------------------------------------------------ surgery
    def _register_memory(self, cfg: MemoryConfig) -> OutputMemory:
        if cfg.name in self._modules or hasattr(type(self), cfg.name) or cfg.name in self.__dict__:
            raise ValueError(f"a memory cannot be named {cfg.name!r}: the model already has an attribute of that name")
        module = cfg.build(self.config)
        if not isinstance(module, OutputMemory):
            raise ValueError(f"{type(cfg).__name__}.build must return an OutputMemory, got {type(module).__name__}")
        self.add_module(cfg.name, module)
        return module

    def add_memory(self, cfg: MemoryConfig) -> OutputMemory:
        """Add an output memory after the existing ones, in place; every other weight is unchanged.

        The new memory is built from ``cfg`` (its parameters at their initial values) on the
        model's device and dtype, and ``config.memories`` lists it: :meth:`save_pretrained` writes it
        and :meth:`from_pretrained` builds it again. States from before the call have one slot too
        few (start new ones with :meth:`init_state`).

        Returns:
            The new memory module (also ``getattr(model, cfg.name)``).

        Raises:
            ValueError: ``cfg`` is not a memory config, or its name is taken.
        """
        if not isinstance(cfg, MemoryConfig):
            raise ValueError(f"add_memory takes a memory config (e.g. EpisodicConfig(...)), got {type(cfg).__name__}")
        memories = check_memories(list(self.config.memories) + [cfg])
        module = self._register_memory(cfg)
        module.to(device=self.device, dtype=self.embed.weight.dtype)
        module.train(self.training)
        self.config = dataclasses.replace(self.config, memories=memories)
        return module

    def set_write(self, name: str, write: str, beta: Optional[float] = None, scale: Optional[float] = None,
                  chunk: Optional[int] = None) -> None:
        """Switch the output memory ``name`` to another write rule (``"delta"`` or ``"error"``,
        :mod:`cl_arch.memory.write`), in place, keeping its keys and learned weights; ``beta`` and
        ``scale`` reset its write strength (0, 1) and read scale on every head (None: keep); ``chunk``
        sets the error write's chunk (``write_chunk``; None: keep). The config records the rule, so
        :meth:`save_pretrained` keeps it. States from before the call do not fit (the error write's
        cache is wider): start new ones.

        Raises:
            KeyError: no memory called ``name``. ValueError: a rule the memory's config refuses.
        """
        mem = self.memory(name)
        if mem is None:
            raise KeyError(f"no memory named {name!r}; this model's: {[m.name for m in self.config.memories]}")
        cfg = dataclasses.replace(mem.config, write=write)  # validates (error writes need one-hot values, ...)
        if beta is not None:
            cfg = dataclasses.replace(cfg, beta=beta)
        if scale is not None:
            cfg = dataclasses.replace(cfg, scale=scale)
        if chunk is not None:
            cfg = dataclasses.replace(cfg, write_chunk=chunk)
        mem.write, mem.config = make_write(write), cfg
        with torch.no_grad():
            if beta is not None:
                mem.beta_logit.fill_(math.log(cfg.beta / (1.0 - cfg.beta)))
            if scale is not None:
                mem.read_scale.fill_(cfg.scale)
        self.config = dataclasses.replace(self.config, memories=[cfg if m.name == name else m
                                                                 for m in self.config.memories])

    def remove_memory(self, name: str) -> OutputMemory:
        """Remove the output memory called ``name``, in place; returns it (``KeyError`` if none)."""
        if self.memory(name) is None:
            raise KeyError(f"no memory named {name!r}; this model's: {[m.name for m in self.config.memories]}")
        module = self._modules.pop(name)
        self.config = dataclasses.replace(self.config, memories=[m for m in self.config.memories if m.name != name])
        return module

    @contextlib.contextmanager
    def memories_off(self, *names: str) -> Iterator["PlasticTransformer"]:
        """Within the block the model reads as if the named output memories were removed (their state
        slots too); they come back, in their places, on exit. For an ablation or for the inputs a
        memory sees, without copying the model."""
        config, saved = self.config, [(n, self.remove_memory(n)) for n in names]
        try:
            yield self
        finally:
            modules = dict(saved)
            for m in self.config.memories:  # re-insert in state order: pop the later ones, then re-add all
                modules[m.name] = self._modules.pop(m.name)
            for m in config.memories:
                self.add_module(m.name, modules[m.name])
            self.config = config

    def fast_layers(self) -> List[PlasticMemory]:
        """Every fast-weight memory, in state order: the blocks' fast mixers, then the output memories."""
        layers: List[PlasticMemory] = [b.mixer for b in self.blocks if isinstance(b.mixer, FastWeightLayer)]
        return layers + self.output_memories()

    def memories(self) -> List[Optional[PlasticMemory]]:
        """One entry per state slot (``state.layers``): the fast memory there, or None (attention)."""
        mems: List[Optional[PlasticMemory]] = [b.mixer if isinstance(b.mixer, FastWeightLayer) else None
                                               for b in self.blocks]
        return mems + self.output_memories()

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, P: Optional[Sequence[Optional[torch.Tensor]]] = None) -> ModelState:
        """Empty state for ``batch_size`` streams, optionally with persistent memories.

        Args:
            P: one entry per fast layer (see :meth:`fast_layers`), each ``[B, H, K, V]``,
               ``[H, K, V]`` (shared by all rows) or None.
        """
        fast = self.fast_layers()
        if P is not None and len(P) != len(fast):
            raise ValueError(f"P must have one entry per fast layer ({len(fast)}), got {len(P)}")
        layers: List[LayerState] = []
        i = 0
        for m in self.memories():
            if m is None:
                layers.append(AttnLayerState())
                continue
            p = None if P is None else P[i]
            if p is not None:
                want = (m.n_heads, m.head_k_dim, m.head_v_dim)
                if tuple(p.shape[-3:]) != want or p.dim() not in (3, 4) or \
                        (p.dim() == 4 and p.shape[0] != batch_size):
                    raise ValueError(f"P[{i}] has shape {tuple(p.shape)}, expected "
                                     f"{(batch_size,) + want} or {want}")
                p = p.to(device=m.W0.device, dtype=m.state_dtype).expand(batch_size, *want).clone()
            layers.append(FastLayerState(P=p))
            i += 1
        return ModelState(layers, 0)

    def commit(self, state, P=None, reward=None, baseline=None, **kwargs):
        """The episode-end commit of every fast memory (:func:`cl_arch.commit.commit_episode`):
        ``(new P per fast layer [B, H, K, V], new baseline [B] or None)``."""
        return commit_episode(self, state, P, reward, baseline, **kwargs)

    def materialize_state(self, state: ModelState, batch_size: Optional[int] = None) -> ModelState:
        """Fill the implicit parts of ``state``: ``S = W0 + P``, ``E = 0``, conv cache = 0.

        The result gives the same outputs and can be combined with :meth:`ModelState.stack`.
        """
        B = batch_size or state.batch_size
        if B is None:
            raise ValueError("materialize_state: state holds no tensor; pass batch_size")
        layers: List[LayerState] = []
        for m, s in zip(self.memories(), state.layers):
            if m is not None:
                shape = (B, m.n_heads, m.head_k_dim, m.head_v_dim)
                zeros = lambda: m.W0.new_zeros(shape, dtype=m.state_dtype)  # noqa: E731
                S = s.S if s.S is not None else m.initial_state(B, s.P).detach().clone()
                E = s.E if (s.E is not None or m.lam is None) else zeros()
                conv = s.conv
                if conv is None and m.cache_shape(B) is not None:
                    conv = m.W0.new_zeros(m.cache_shape(B))
                layers.append(FastLayerState(S=S, E=E, P=s.P, conv=conv))
            else:
                layers.append(s)
        return ModelState(layers, state.position)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids, state, modulation) -> None:
        # Value checks read tensors back to the host (a device sync each): they guard calls whose ids
        # and modulation come from a user. The training loops set ``check_inputs = False`` (their
        # inputs come from the data pipeline), as does CL_ARCH_VALUE_CHECKS=0 for every call.
        outputs = "".join(f" + the {m.name} memory" for m in self.config.memories)
        check_step_inputs(input_ids, state, modulation, vocab_size=self.config.vocab_size, memories=self.memories(),
                          check_values=VALUE_CHECKS and self.check_inputs,
                          layout=f"{self.config.n_layers} blocks{outputs}")

    def forward(
        self,
        input_ids: torch.Tensor,
        state: Optional[ModelState] = None,
        modulation: Optional[torch.Tensor] = None,
        return_state: bool = True,
        lam: Optional[Union[float, Sequence[Optional[float]]]] = None,
    ) -> Tuple[torch.Tensor, Optional[ModelState]]:
        """
        Args:
            input_ids: ``[B, T]`` integer token ids in ``[0, vocab_size)``.
            state: from a previous call (continues that stream), from :meth:`init_state`, or
                None (fresh episode without persistent memory).
            modulation: ``[B, T]`` in [0, 1], scales every fast layer's write strength.
            return_state: if False the fast layers skip their final states (cheaper training).
            lam: trace-decay override in [0, 1] (e.g. a :class:`~cl_arch.session.Session`'s
                hand-set value): a float for every fast layer, or one entry (float or None =
                the layer's own) per fast layer. None: each layer uses its learned ``lam``.

        Returns:
            ``logits [B, T, vocab_size]`` and the new :class:`ModelState` (None if not requested).
        """
        self._check_inputs(input_ids, state, modulation)
        n_fast = len(self.fast_layers())
        if lam is None or isinstance(lam, (int, float)):
            lams = [lam] * n_fast
        else:
            lams = list(lam)
            if len(lams) != n_fast:
                raise ValueError(f"lam must be a float or have one entry per fast layer ({n_fast}), got {len(lams)}")
        for v in lams:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ValueError(f"lam must be in [0, 1], got {v!r}")
        lam_iter = iter(lams)
        B, T = input_ids.shape
        position = state.position if state is not None else 0
        layer_states = state.layers if state is not None else [None] * len(self.memories())

        ctx = StepContext(position=position, modulation=modulation, need_state=return_state)
        x = self.dropout(self.embed(input_ids))
        new_layers: List[LayerState] = []
        for block, s in zip(self.blocks, layer_states):
            block_ctx = dataclasses.replace(ctx, lam=next(lam_iter)) if block.layer_type == "fast" else ctx
            x, new_s = block(x, s, block_ctx)
            new_layers.append(new_s)
        h = self.norm_f(x)
        logits = self.lm_head(h)
        out = OutputContext(h, input_ids, self.embed, self.lm_head)
        for mem, s in zip(self.output_memories(), layer_states[len(self.blocks):]):
            read, new_s = mem(dataclasses.replace(out, logits=logits), s, dataclasses.replace(ctx, lam=next(lam_iter)))
            logits = logits + read
            new_layers.append(new_s)
        if not return_state:
            return logits, None
        return logits, ModelState(new_layers, position + T)

    # ------------------------------------------------------------------ checkpoints
    def _export_tensors(self) -> Dict[str, torch.Tensor]:
        """The state dict as saved: the tied lm_head copy is dropped (safetensors forbids aliases)."""
        sd = self.state_dict()
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over the config's non-default fields (sorted JSON) and every saved
        tensor (name, dtype, shape, bytes; sorted by name). Ties checkpoints and saved states to
        weights; a config field added later with a behaviour-preserving default leaves it alone."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config.to_diff_dict(), sort_keys=True).encode())
        for name, t in sorted(self._export_tensors().items()):
            t = t.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write a checkpoint folder that every loader reads (docs/design.md, "State, sessions and files"):

        - ``model.safetensors``: the tensors under the model's own names (the tied ``lm_head`` once);
        - ``config.json``: the config (``"config"``), fingerprint, ``cl_arch_version``,
          ``fast_memory_format``, and for ``transformers`` ``model_type: "cl_arch"`` and
          ``architectures``;
        - ``tokenizer_config.json``: the byte tokenizer (``ClArchByteTokenizer``, its ``vocab_size``).

        :meth:`from_pretrained` reads it, and after ``import cl_arch.hf`` so do
        ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` and
        ``pipeline``; this module writes the JSON itself and never imports ``transformers``.
        The files are written under temporary names and moved into place as one journaled commit
        (:func:`cl_arch.io.atomic_write_many`): a crash at any moment leaves the previous checkpoint
        or this one, never this one's weights beside the previous config.
        """
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._export_tensors().items()}
        meta = checkpoint_meta(self.config, self.fingerprint())
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        tok_text = json.dumps(tokenizer_config(self.config), indent=2, sort_keys=True) + "\n"

        atomic_write_many([
            (os.path.join(directory, WEIGHTS_NAME),
             lambda p: save_file(tensors, p, metadata={"format": "pt", "fingerprint": meta["fingerprint"]})),
            (os.path.join(directory, TOKENIZER_CONFIG_NAME), text_writer(tok_text)),
            (os.path.join(directory, CONFIG_NAME), text_writer(text)),  # last: the commit is named after it
        ])

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike],
                        map_location: Union[str, torch.device] = "cpu") -> "PlasticTransformer":
        """Load a checkpoint folder; weights keep their saved dtype.

        Reads what :meth:`save_pretrained` writes now and wrote before (``config.json`` without
        ``model_type``, as the shipped model's was), and what ``ClArchForCausalLM.save_pretrained``
        (``cl_arch.hf``) writes now and wrote before (the config under ``"plastic"``, tensors named
        ``model.<name>``). Only JSON and safetensors are read: nothing in the folder runs code.

        Raises:
            FileNotFoundError: the directory or one of its two files is missing.
            ValueError: a file is corrupt, ``config.json`` is not a cl_arch config (the message says
                which keys it lacks), the tensors do not fit the config, or the weights'
                fingerprint differs from the one recorded at save time.
        """
        from safetensors.torch import load_file

        directory = os.fspath(directory)
        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        if os.path.isdir(directory):
            recover(cfg_path)  # finish a save that a crash interrupted (no-op otherwise)
        for path in (cfg_path, w_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"not a cl_arch checkpoint: {path} is missing")
        try:
            with open(cfg_path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt checkpoint config {cfg_path}: {e}") from e
        cfg_dict, fmt = read_checkpoint_meta(meta, cfg_path)
        check_fast_memory_format(fmt, directory)
        try:
            config = PlasticConfig.from_dict(cfg_dict)
        except TypeError as e:
            raise ValueError(f"corrupt checkpoint config {cfg_path}: {e}") from e
        try:
            tensors = load_file(w_path, device=str(torch.device(map_location)))
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) types
            raise ValueError(f"corrupt checkpoint weights {w_path}: {e}") from e
        tensors = _own_names(tensors, config)

        model = cls(config)
        expected = model._export_tensors()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"checkpoint {w_path} does not match its config: "
                             f"missing {missing}, unexpected {unexpected}")
        for name, t in tensors.items():
            if t.shape != expected[name].shape:
                raise ValueError(f"checkpoint {w_path}: tensor {name} has shape {tuple(t.shape)}, "
                                 f"the config implies {tuple(expected[name].shape)}")
            if not t.is_floating_point():  # a tampered header's dtype; load_state_dict would fail unnamed
                raise ValueError(f"checkpoint {w_path}: tensor {name} has dtype {t.dtype}, "
                                 "weights are floating point")
        # assign=True keeps the saved dtype and device (a float64 checkpoint stays float64).
        model.load_state_dict(tensors, strict=False, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed.weight  # assign replaced embed.weight: re-tie
        model.to(map_location)

        stored = meta.get("fingerprint")
        actual = model.fingerprint()
        if stored is not None and stored != actual:
            raise ValueError(f"checkpoint {directory}: weights fingerprint {actual} does not match "
                             f"the recorded {stored} (files modified or mixed up)")
        return model


# ---------------------------------------------------------------------- the checkpoint folder's JSON
# One folder format for every writer and reader: PlasticTransformer.save_pretrained and
# ClArchForCausalLM.save_pretrained (cl_arch.hf) write it; PlasticTransformer.from_pretrained and,
# after `import cl_arch.hf`, AutoConfig / AutoModelForCausalLM / AutoTokenizer read it.

def checkpoint_meta(config: PlasticConfig, fingerprint: Optional[str]) -> dict:
    """``config.json`` of a checkpoint folder: the config under ``"config"``, the weights'
    ``fingerprint`` (None: not recorded), ``cl_arch_version``, ``fast_memory_format``, and
    ``model_type`` / ``architectures`` for ``transformers``."""
    from .version import __version__

    return {"architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE, "config": config.to_dict(),
            "fingerprint": fingerprint, "cl_arch_version": __version__, "fast_memory_format": FAST_MEMORY_FORMAT}


def tokenizer_config(config: PlasticConfig) -> dict:
    """``tokenizer_config.json`` of a checkpoint folder: the byte tokenizer
    (``cl_arch.hf.ClArchByteTokenizer``, ids 0-255 = bytes) for ``config.vocab_size`` ids."""
    return {"tokenizer_class": TOKENIZER_CLASS, "vocab_size": config.vocab_size,
            "clean_up_tokenization_spaces": False}


def read_checkpoint_meta(meta: object, cfg_path: str = CONFIG_NAME) -> Tuple[dict, int]:
    """``(PlasticConfig dict, fast_memory_format)`` of a checkpoint's ``config.json`` in any layout.

    Layouts: ``"config"`` (what :meth:`PlasticTransformer.save_pretrained` writes, with or without
    ``model_type``; no ``fast_memory_format`` means 1), or ``model_type: "cl_arch"`` with
    ``"plastic"`` (``ClArchForCausalLM.save_pretrained`` before the two were one format; the
    transformers integration came after format 2, so a missing one means 2).

    Raises:
        ValueError: not a dict; another model type; neither layout (the message names the keys).
    """
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint config {cfg_path}: a JSON object is expected, got "
                         f"{type(meta).__name__}")
    model_type = meta.get("model_type")
    if model_type is not None and model_type != HF_MODEL_TYPE:
        raise ValueError(f"not a cl_arch checkpoint: {cfg_path} has model_type {model_type!r}, "
                         f"expected {HF_MODEL_TYPE!r}")
    if "config" in meta:
        cfg, default_fmt = meta["config"], 1
    elif model_type == HF_MODEL_TYPE and "plastic" in meta:
        cfg, default_fmt = meta["plastic"], FAST_MEMORY_FORMAT
    else:
        raise ValueError(f"not a cl_arch checkpoint: {cfg_path} has no 'config' key (the PlasticConfig, "
                         f"written by PlasticTransformer.save_pretrained) and no model_type "
                         f"{HF_MODEL_TYPE!r} with a 'plastic' key (written by ClArchForCausalLM.save_pretrained); "
                         f"its keys: {sorted(meta)[:12]}")
    if not isinstance(cfg, dict):
        raise ValueError(f"corrupt checkpoint config {cfg_path}: the model config is a {type(cfg).__name__}, "
                         "not a JSON object")
    return cfg, meta.get("fast_memory_format", default_fmt)


def check_fast_memory_format(fmt: object, where: str) -> None:
    """Refuse a checkpoint trained under another meaning of W0 (:data:`FAST_MEMORY_FORMAT`)."""
    if fmt != FAST_MEMORY_FORMAT:
        raise ValueError(
            f"checkpoint {where} has fast_memory_format {fmt}, this cl_arch reads {FAST_MEMORY_FORMAT}: "
            "it was trained when the fast memory decayed toward zero and W0 was only each episode's "
            "starting point; the current rule decays toward the resting state W0 + P "
            "(docs/design.md, 'The rule'), under which those weights compute something else. "
            "Retrain it with this version.")


def _own_names(tensors: Dict[str, torch.Tensor], config: PlasticConfig) -> Dict[str, torch.Tensor]:
    # The transformers wrapper names every tensor model.<name> (its base_model_prefix); the model's
    # own names never start with "model.", so a file whose names all do is the wrapper's.
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
    if config.tie_embeddings and "lm_head.weight" in tensors and "embed.weight" in tensors \
            and torch.equal(tensors["lm_head.weight"], tensors["embed.weight"]):
        del tensors["lm_head.weight"]  # a writer that stored the tied copy as well
    return tensors


def default_model_dir() -> str:
    """The folder of the shipped model, ``cl_arch/assets/default_model`` (it may be absent if the
    package was installed without its assets)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")


def load_default(map_location: Union[str, torch.device] = "cpu") -> PlasticTransformer:
    """The shipped model (a byte-level model pretrained on the Python standard library; see
    ``configs/default_model.yaml`` and ``pretrain.json`` beside it), in eval mode.

    ``PlasticTransformer.from_pretrained(default_model_dir())``; after ``import cl_arch.hf``,
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(default_model_dir())`` read the same folder.

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    folder = default_model_dir()
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise FileNotFoundError(f"no shipped default model in {folder} (the package was installed without "
                                "cl_arch/assets/default_model)")
    return PlasticTransformer.from_pretrained(folder, map_location=map_location).eval()
