"""A :class:`~cl_arch.PlasticTransformer` as a ``transformers`` model (docs/design.md, "Public API").

``ClArchConfig`` (model_type ``"cl_arch"``) holds a :class:`~cl_arch.PlasticConfig` as a dict;
``ClArchForCausalLM`` wraps the model unchanged (its weights are ``model.<name>`` of the
PlasticTransformer's own names), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it and
``generate`` runs it. Both read and write the one checkpoint folder format of
:meth:`cl_arch.PlasticTransformer.save_pretrained` (docs/design.md, "State, sessions and files"):
either writer's folder loads through either class. The fast state (fast weights, traces, conv and KV caches, position) travels
in a :class:`PlasticCache`, the way a KV cache does: the prompt is read in one call and each new
token is fed alone with the cache returned by the previous step, which is exactly what
:meth:`cl_arch.Session.generate` does, so greedy decoding gives the same tokens.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import PlasticConfig
from ..io import atomic_write, text_writer
from ..model import (FAST_MEMORY_FORMAT, TOKENIZER_CONFIG_NAME, PlasticTransformer, check_fast_memory_format,
                     checkpoint_meta, tokenizer_config)
from ..state import ModelState


class ClArchConfig(PretrainedConfig):
    """``transformers`` config of a PlasticTransformer: ``plastic`` is ``PlasticConfig.to_dict()``.

    It reads and writes the checkpoint folder's ``config.json`` as
    :meth:`cl_arch.PlasticTransformer.save_pretrained` does (:func:`cl_arch.model.checkpoint_meta`):
    the PlasticConfig under ``"config"``, plus ``fingerprint``, ``cl_arch_version`` and
    ``fast_memory_format``; a ``config.json`` written by this class before the two were one format
    (the PlasticConfig under ``"plastic"``) still loads.

    Raises:
        ValueError: ``plastic`` is not a valid PlasticConfig (the message names the field); both
            ``plastic`` and ``config`` given and different; a ``fast_memory_format`` other than
            this cl_arch's.
    """

    model_type = "cl_arch"

    plastic: Optional[Dict[str, Any]] = None
    vocab_size: int = 256
    use_cache: bool = True
    # Follows plastic["tie_embeddings"]: transformers then saves the tied lm_head once and re-ties it
    # on load, as PlasticTransformer does (ClArchForCausalLM._tied_weights_keys).
    tie_word_embeddings: bool = True
    # The weights' PlasticTransformer.fingerprint() at save time (ClArchForCausalLM.save_pretrained
    # records it; from_pretrained checks it); None: not recorded.
    fingerprint: Optional[str] = None
    fast_memory_format: Optional[int] = None
    cl_arch_version: Optional[str] = None

    def __post_init__(self, **kwargs):
        from_file = kwargs.pop("config", None)  # the folder's "config" key: the PlasticConfig
        if from_file is not None:
            if not isinstance(from_file, dict):
                raise ValueError(f"ClArchConfig: 'config' must be a PlasticConfig dict, got {type(from_file).__name__}")
            if self.plastic is not None and PlasticConfig.from_dict(dict(self.plastic)) != PlasticConfig.from_dict(dict(from_file)):
                raise ValueError("ClArchConfig: 'plastic' and 'config' both given and different")
            self.plastic = from_file
        # A missing format: 1 for the core's layout ("config", before formats were recorded), 2 for
        # this class's old one ("plastic": the transformers integration came after format 2).
        fmt = self.fast_memory_format
        if fmt is None:
            fmt = 1 if from_file is not None else FAST_MEMORY_FORMAT
        check_fast_memory_format(fmt, "config")
        self.fast_memory_format = fmt
        pc = PlasticConfig.from_dict(dict(self.plastic or {}))
        self.plastic = pc.to_dict()
        self.vocab_size = pc.vocab_size
        self.tie_word_embeddings = pc.tie_embeddings
        super().__post_init__(**kwargs)

    def plastic_config(self) -> PlasticConfig:
        """The :class:`PlasticConfig` this config holds."""
        return PlasticConfig.from_dict(dict(self.plastic))

    def to_dict(self) -> Dict[str, Any]:
        """As ``PretrainedConfig.to_dict``, with the checkpoint folder's keys
        (:func:`cl_arch.model.checkpoint_meta`): the PlasticConfig under ``"config"``."""
        out = super().to_dict()
        plastic = out.pop("plastic", None)
        out.update({k: v for k, v in checkpoint_meta(PlasticConfig.from_dict(dict(plastic or {})),
                                                     self.fingerprint).items() if k != "architectures"})
        return out


class PlasticCache(Cache):
    """A :class:`~cl_arch.state.ModelState` in the place ``generate`` keeps a KV cache.

    ``get_seq_length()`` is the stream's position (tokens read so far). It cannot be cropped or
    reordered: a fast memory does not un-write a token (so no beam search or assisted decoding).
    """

    def __init__(self, state: ModelState):
        super().__init__(layers=[])
        if not isinstance(state, ModelState):
            raise ValueError(f"PlasticCache holds a ModelState, got {type(state).__name__}")
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("PlasticCache cannot be reordered: beam search is not supported by fast-weight models")


class ClArchPreTrainedModel(PreTrainedModel):
    config_class = ClArchConfig
    base_model_prefix = "model"
    _is_stateful = True  # generate refuses assisted decoding, which would need to un-read tokens
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # used when tie_word_embeddings

    def _init_weights(self, module):
        # PlasticTransformer initialises itself in its constructor; loading overwrites every tensor.
        pass


class ClArchForCausalLM(ClArchPreTrainedModel, GenerationMixin):
    """``transformers`` causal LM around one :class:`PlasticTransformer` (``self.model``).

    ``forward(input_ids [B, T], cache=None, labels=None, modulation=None)`` returns
    ``CausalLMOutputWithPast(logits [B, T, V], cache=PlasticCache)``; pass the cache back to continue
    the stream. ``attention_mask`` may be given but must be all ones: a fast memory has no way to
    skip padding it has already written.
    """

    def __init__(self, config: ClArchConfig):
        super().__init__(config)
        pc = config.plastic_config()
        self.model = PlasticTransformer(pc)
        self.post_init()

    @classmethod
    def from_plastic(cls, model: PlasticTransformer) -> "ClArchForCausalLM":
        """Wrap an existing PlasticTransformer (its weights are shared, not copied)."""
        if not isinstance(model, PlasticTransformer):
            raise ValueError(f"from_plastic takes a PlasticTransformer, got {type(model).__name__}")
        out = cls(ClArchConfig(plastic=model.config.to_dict()))
        out.model = model
        return out

    @property
    def plastic_model(self) -> PlasticTransformer:
        """The wrapped :class:`PlasticTransformer` (``self.model``): what :class:`cl_arch.Session`
        takes when it is given this wrapper."""
        return self.model

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, state_dict=None, **kwargs):
        """``PreTrainedModel.save_pretrained``, writing the one checkpoint folder format
        (:meth:`cl_arch.PlasticTransformer.save_pretrained`): ``config.json`` with the PlasticConfig
        under ``"config"`` and the weights' fingerprint, and the byte tokenizer's
        ``tokenizer_config.json``. Tensors are named ``model.<name>`` (this class's prefix), which
        ``PlasticTransformer.from_pretrained`` reads as well. With ``state_dict`` given (as the
        ``Trainer`` does) no fingerprint is recorded: those tensors are not known to be this model's.
        """
        import json
        import os

        self.config.fingerprint = self.model.fingerprint() if state_dict is None else None
        out = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, state_dict=state_dict,
                                      **kwargs)
        if is_main_process:
            text = json.dumps(tokenizer_config(self.model.config), indent=2, sort_keys=True) + "\n"
            atomic_write(os.path.join(os.fspath(save_directory), TOKENIZER_CONFIG_NAME), text_writer(text))
        return out

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the weights' fingerprint checked against the
        one recorded in ``config.json`` (as :meth:`cl_arch.PlasticTransformer.from_pretrained` does),
        unless ``dtype`` asked for another precision than the saved one.

        Raises:
            ValueError: the loaded weights' fingerprint differs from the recorded one (files
                modified or mixed up).
        """
        model = super().from_pretrained(*args, **kwargs)
        stored = getattr(model.config, "fingerprint", None)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if stored is not None and dtype in (None, "auto"):
            actual = model.model.fingerprint()
            if actual != stored:
                where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                raise ValueError(f"checkpoint {where}: weights fingerprint {actual} does not match "
                                 f"the recorded {stored} (files modified or mixed up)")
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (PlasticCache), built by its first forward

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: Optional[torch.LongTensor] = None, cache: Optional[PlasticCache] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, modulation: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
        """``input_ids [B, T]``; ``labels [B, T]`` (shifted inside, -100 ignored) gives ``loss``.

        Raises:
            ValueError: no ``input_ids``, padding in ``attention_mask``, a cache that is not a
                PlasticCache, or anything :meth:`PlasticTransformer.forward` refuses.
        """
        if input_ids is None:
            raise ValueError("ClArchForCausalLM needs input_ids (inputs_embeds are not supported)")
        if kwargs.get("past_key_values") is not None and cache is None:
            cache = kwargs["past_key_values"]
        if cache is not None and not isinstance(cache, PlasticCache):
            raise ValueError(f"cache must be a PlasticCache (from this model's previous output), got {type(cache).__name__}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask has zeros: padding is not supported (a fast memory writes every "
                             "token it reads); generate prompts of one length, or one at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = cache.state if cache is not None else None
        logits, new_state = self.model(input_ids, state=state, modulation=modulation, return_state=bool(use_cache))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      cache=PlasticCache(new_state) if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: Optional[PlasticCache] = None,
                                      attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Dict[str, Any]:
        """Only the tokens the cache has not read yet (all of them at the first step)."""
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "use_cache": True, "attention_mask": attention_mask}
