"""Saving and loading a retrofit: the base model's weights are never written.

A retrofit folder holds two files, committed together (:func:`cl_arch.io.atomic_write_many`):

- ``retrofit_layers.safetensors``: the added memories' tensors (``<block index>.<name>``; an episodic
  memory's as ``episodic.<name>``, its fixed projection ``R`` included, so keys read back as written);
- ``retrofit.json``: format, the :class:`RetrofitConfig`, the base model it was made for
  (``name_or_path``, ``model_type``, class, fingerprint over its weights) and the fingerprint of the
  whole retrofit.

Loading rebuilds the hooks on a base model given (or loaded from the recorded ``name_or_path``) and
refuses a base whose weights differ from the recorded fingerprint: the added layers were trained
on that base's hidden states and mean nothing on another's.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch.nn as nn

from ..io import atomic_write_many, recover, text_writer
from ..version import __version__
from .retrofit import RetrofitConfig, RetrofitModel, model_family

RETROFIT_CONFIG = "retrofit.json"
RETROFIT_WEIGHTS = "retrofit_layers.safetensors"
FORMAT = "cl_arch.retrofit/1"


def save_retrofit(model: RetrofitModel, directory: Union[str, os.PathLike], base_name: Optional[str] = None) -> str:
    """Write the added layers of ``model`` and a config naming its base into ``directory``.

    Args:
        base_name: how to find the base again (a path or hub id); default the base config's
            ``name_or_path`` (what ``from_pretrained`` recorded).

    Returns:
        the path of ``retrofit.json``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, RetrofitModel):
        raise ValueError(f"save_retrofit takes a RetrofitModel, got {type(model).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.fast.state_dict().items()}
    base = model.base
    meta = {
        "format": FORMAT, "cl_arch_version": __version__,
        "retrofit": model.config.to_dict(),
        "base": {"name_or_path": base_name if base_name is not None else getattr(base.config, "_name_or_path", "") or "",
                 "model_type": base.config.model_type, "class": type(base).__name__,
                 "fingerprint": model.base_fingerprint()},
        "fingerprint": model.fingerprint(),
    }
    cfg_path = os.path.join(directory, RETROFIT_CONFIG)
    atomic_write_many([
        (os.path.join(directory, RETROFIT_WEIGHTS),
         lambda p: save_file(tensors, p, metadata={"fingerprint": meta["fingerprint"]})),
        (cfg_path, text_writer(json.dumps(meta, indent=2, sort_keys=True) + "\n")),  # last: names the commit
    ])
    return cfg_path


def read_retrofit_config(directory: Union[str, os.PathLike]) -> dict:
    """The ``retrofit.json`` of a saved retrofit (after finishing an interrupted save)."""
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, RETROFIT_CONFIG)
    if os.path.isdir(directory):
        recover(cfg_path)
    for path in (cfg_path, os.path.join(directory, RETROFIT_WEIGHTS)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"not a cl_arch retrofit: {path} is missing")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        meta["base"]["fingerprint"], meta["retrofit"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"corrupt retrofit config {cfg_path}: {e}") from e
    return meta


def load_retrofit(directory: Union[str, os.PathLike], base: Union[None, str, os.PathLike, nn.Module] = None,
                  map_location: str = "cpu") -> RetrofitModel:
    """Rebuild a retrofit saved by :func:`save_retrofit` on its base model.

    Args:
        base: the base model (a ``transformers`` causal LM), a path/hub id to load it from with
            ``AutoModelForCausalLM.from_pretrained``, or None (the recorded ``name_or_path``).

    Raises:
        FileNotFoundError: a file of the retrofit is missing.
        ValueError: a corrupt file; a base of another family; a base whose weights differ from the
            ones the layers were trained on (fingerprints named); added tensors that do not fit.
    """
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    meta = read_retrofit_config(directory)
    cfg = RetrofitConfig.from_dict(meta["retrofit"])
    want = meta["base"]
    if base is None:
        base = want.get("name_or_path") or None
        if base is None:
            raise ValueError(f"retrofit {directory} records no base path: pass base=")
    if not isinstance(base, nn.Module):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(os.fspath(base))
    family = model_family(base)
    if family != cfg.family:
        raise ValueError(f"retrofit {directory} was made for a {cfg.family} model ({want.get('class')}), "
                         f"the base given is {family} ({type(base).__name__})")
    model = RetrofitModel(base, cfg)
    have = model.base_fingerprint()
    if have != want["fingerprint"]:
        for h in model._handles:  # leave the caller's base as it was
            h.remove()
        raise ValueError(f"retrofit {directory} was trained on base {want.get('name_or_path')!r} with weights "
                         f"fingerprint {want['fingerprint']}; the base given has fingerprint {have} (other or "
                         "modified weights): its added layers would mean nothing on it, refusing to load")
    try:
        tensors = load_file(os.path.join(directory, RETROFIT_WEIGHTS), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"corrupt retrofit weights in {directory}: {e}") from e
    expected = model.fast.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [n for n in tensors if n in expected and tensors[n].shape != expected[n].shape]
    if missing or unexpected or bad:
        raise ValueError(f"retrofit weights in {directory} do not fit its config: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {bad}")
    model.fast.load_state_dict(tensors)
    model.to(model.device)
    if meta.get("fingerprint") not in (None, model.fingerprint()):
        raise ValueError(f"retrofit {directory}: fingerprint {model.fingerprint()} differs from the recorded "
                         f"{meta['fingerprint']} (files modified or mixed up)")
    return model
