"""The byte tokenizer of cl_arch models: ``text.encode("utf-8")`` as ids (docs/design.md, "Public API").

Every cl_arch model reads raw bytes: id ``b`` (0-255) is the byte ``b``; the shipped model was
pretrained on UTF-8 source text with no special tokens (the synthetic tasks of ``train/tasks.py``
reserve byte values 0-5 as PAD/BOS/..., but those are bytes of their own streams, not markers a
tokenizer adds to text). So :class:`ClArchByteTokenizer` adds nothing to what it encodes, has no
BOS/EOS/pad/unk token by default, and ``decode(encode(text)) == text`` for any ``str``; a byte
sequence that is not valid UTF-8 (a generation cut inside a character, say) decodes with U+FFFD
replacement characters, never an exception.

A model with ``vocab_size`` V > 256 has ids 256..V-1 that are no byte: the tokenizer names them
``<|extra_{id}|>`` (special tokens, dropped by ``decode(..., skip_special_tokens=True)``), so
``len(tokenizer) == V``. A model with V < 256 reads bytes below V only: encoding a byte >= V is
refused with a ValueError naming it.

The tokenizer needs no vocabulary file: ``tokenizer_config.json`` (``tokenizer_class`` and
``vocab_size``) is all of it, and :meth:`cl_arch.PlasticTransformer.save_pretrained` writes that
file as plain JSON (:func:`cl_arch.model.tokenizer_config`) without importing ``transformers``.
``import cl_arch.hf`` registers the class with ``AutoTokenizer`` for model_type ``"cl_arch"``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Union

from transformers import AddedToken, PreTrainedTokenizer

from ..model import CONFIG_NAME, TOKENIZER_CONFIG_NAME, read_checkpoint_meta

N_BYTES = 256


def extra_token(i: int) -> str:
    """The name of id ``i`` >= 256 of a model whose vocabulary is larger than the bytes."""
    return f"<|extra_{i}|>"


class ClArchByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as token ids 0-255 (plus ``<|extra_{id}|>`` up to ``vocab_size`` - 1).

    Args:
        vocab_size: the model's ``PlasticConfig.vocab_size`` (default 256).
        bos_token, eos_token, unk_token, pad_token: None by default (the models have none); a
            token given here is an added special token after the model's ids.
        **kwargs: passed to :class:`transformers.PreTrainedTokenizer`.

    Raises:
        ValueError: ``vocab_size`` is not a positive integer; at encode time, a byte the model's
            vocabulary does not hold; at decode time, an id neither a byte nor a known token.
    """

    vocab_files_names: Dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_size: int = N_BYTES, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 clean_up_tokenization_spaces: bool = False, **kwargs):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer (the model's PlasticConfig.vocab_size), "
                             f"got {vocab_size!r}")
        self.model_vocab_size = vocab_size
        self.n_bytes = min(N_BYTES, vocab_size)
        # Ids past the bytes exist before anything else is added (a reload passes them again, equal).
        self._added_tokens_decoder = {
            i: AddedToken(extra_token(i), special=True, normalized=False, lstrip=False, rstrip=False)
            for i in range(N_BYTES, vocab_size)}
        kwargs.setdefault("split_special_tokens", False)
        kwargs.setdefault("spaces_between_special_tokens", False)
        super().__init__(vocab_size=vocab_size, bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         pad_token=pad_token, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedTokenizer.from_pretrained``; a local model folder without
        ``tokenizer_config.json`` (one ``ClArchForCausalLM.save_pretrained`` wrote before it saved
        the tokenizer too) gives ``vocab_size`` from its ``config.json`` (read as JSON only)."""
        folder = pretrained_model_name_or_path
        if ("vocab_size" not in kwargs and isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder)
                and not os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME))
                and os.path.isfile(os.path.join(folder, CONFIG_NAME))):
            try:
                with open(os.path.join(folder, CONFIG_NAME)) as f:
                    cfg, _ = read_checkpoint_meta(json.load(f))
                vocab = cfg.get("vocab_size", N_BYTES)
            except (OSError, ValueError, UnicodeDecodeError):  # not a cl_arch config: the default vocabulary
                vocab = None
            if isinstance(vocab, int) and not isinstance(vocab, bool):
                kwargs["vocab_size"] = vocab
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def vocab_size(self) -> int:
        """The ids that are bytes: 256 (fewer for a model whose vocabulary is smaller)."""
        return self.n_bytes

    def get_vocab(self) -> Dict[str, int]:
        vocab = {chr(i): i for i in range(self.n_bytes)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        # A token is the byte's code point as a one-character string (as ByT5's).
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> Optional[int]:
        if len(token) == 1 and ord(token) < N_BYTES:
            b = ord(token)
            if b >= self.n_bytes:
                raise ValueError(f"byte 0x{b:02x} is outside this model's vocabulary of {self.model_vocab_size} "
                                 f"ids (ids 0-{self.n_bytes - 1} are bytes)")
            return b
        if self.unk_token_id is not None:
            return self.unk_token_id
        raise ValueError(f"{token!r} is neither a byte nor a token of this tokenizer")

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.n_bytes:
            return chr(index)
        raise ValueError(f"id {index} is neither a byte (0-{self.n_bytes - 1}) nor an added token of this "
                         f"tokenizer ({len(self)} ids)")

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        out = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                out += token.encode("utf-8")
            else:
                out.append(ord(token))
        return out.decode("utf-8", errors="replace")

    def _decode(self, token_ids: Union[int, List[int]], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: Optional[bool] = None, **kwargs) -> str:
        # From the ids, not the token strings: a byte and an added one-character token never mix up.
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        skip = set()
        if skip_special_tokens:  # the named ones and the <|extra_*|> ids (AddedToken.special)
            skip = set(self.all_special_ids) | {i for i, t in self._added_tokens_decoder.items() if t.special}
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.n_bytes and i not in self._added_tokens_decoder:
                out.append(i)
            elif i in self._added_tokens_decoder:
                if i not in skip:
                    out += self._added_tokens_decoder[i].content.encode("utf-8")
            else:
                self._convert_id_to_token(i)  # raises, naming the id
        text = out.decode("utf-8", errors="replace")
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple:
        return ()  # no vocabulary file: tokenizer_config.json holds all there is


__all__ = ["ClArchByteTokenizer", "extra_token", "N_BYTES"]
