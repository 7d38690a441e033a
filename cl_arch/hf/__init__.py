"""``transformers`` integration (optional extra ``pip install -e ".[hf]"``; docs/design.md, "Public API").

- :class:`ClArchConfig` / :class:`ClArchForCausalLM`: a PlasticTransformer as a ``transformers``
  model, registered with ``AutoConfig`` and ``AutoModelForCausalLM`` (model_type ``"cl_arch"``)
  when this package is imported; ``generate`` carries the fast state in a :class:`PlasticCache`.
- :class:`ClArchByteTokenizer`: UTF-8 bytes as ids 0-255, registered with ``AutoTokenizer`` for
  model_type ``"cl_arch"``; with the two above, ``AutoConfig`` / ``AutoModelForCausalLM`` /
  ``AutoTokenizer.from_pretrained(dir)`` and ``pipeline("text-generation", model=dir)`` read any
  folder :meth:`cl_arch.PlasticTransformer.save_pretrained` writes (the shipped model's included).
- :func:`retrofit`: fast-weight memories added beside the attention of a pretrained
  ``transformers`` causal LM (Llama / Qwen2 / Mistral family, GPT-2), giving a
  :class:`RetrofitModel` that satisfies :class:`cl_arch.protocols.PlasticModel`, so
  :class:`~cl_arch.Session` and :mod:`cl_arch.consolidate` take it; ``episodic_heads=1`` (or
  :func:`add_episodic_memory`) also adds an episodic memory after the base's final norm.
- :func:`save_retrofit` / :func:`load_retrofit`: the added layers in their own safetensors file
  beside a config naming (and fingerprinting) the base model.

``import cl_arch`` never imports this package (nor ``transformers``).
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("cl_arch.hf needs the 'transformers' package: pip install -e \".[hf]\"") from e

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .files import RETROFIT_CONFIG, RETROFIT_WEIGHTS, load_retrofit, save_retrofit
from .modeling import ClArchConfig, ClArchForCausalLM, PlasticCache
from .retrofit import RetrofitConfig, RetrofitModel, add_episodic_memory, retrofit
from .tokenizer import ClArchByteTokenizer

AutoConfig.register("cl_arch", ClArchConfig, exist_ok=True)
AutoModelForCausalLM.register(ClArchConfig, ClArchForCausalLM, exist_ok=True)
AutoTokenizer.register(ClArchConfig, ClArchByteTokenizer, exist_ok=True)

__all__ = ["ClArchConfig", "ClArchForCausalLM", "ClArchByteTokenizer", "PlasticCache", "RetrofitConfig", "RetrofitModel", "retrofit", "add_episodic_memory",
           "save_retrofit", "load_retrofit", "RETROFIT_CONFIG", "RETROFIT_WEIGHTS"]
