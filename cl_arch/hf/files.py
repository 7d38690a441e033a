"""Saving and loading a retrofit: the base model's weights are never written.

A retrofit folder holds two files, committed together (:func:`cl_arch.io.atomic_write_many`):

- ``retrofit_layers.safetensors``: the added memories' tensors (``<block index>.<name>``; an episodic
  memory's as ``episodic.<name>``, its fixed projection ``R`` included, so keys read back as written);
- ``retrofit.json``: format, the :class:`RetrofitConfig`, the base model it was made for
  (``name_or_path`` as given, ``path``: its folder resolved to an absolute path when it was a local
  folder, ``model_type``, class, fingerprint over its weights) and the fingerprint of the whole retrofit.

Loading checks the added tensors against the config and the base's weights against the recorded
fingerprint before it attaches anything, so a refused load leaves the caller's base as it was: the
added layers were trained on that base's hidden states and mean nothing on another's. Without an
explicit base it loads the recorded folder (``path``) or, for a hub id, the local Hugging Face
cache only: a name read from a file is untrusted and never causes a download.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch.nn as nn

from ..io import atomic_write_many, recover, text_writer
from ..version import __version__
from .retrofit import (RetrofitConfig, RetrofitModel, base_fingerprint, build_fast, check_base, model_family,
                       retrofit_fingerprint)

def load_base_model(source: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(source)`` with no remote code; ``kwargs`` go to it. Weights kept
    as a pickle (``pytorch_model.bin``) load with ``weights_only`` (transformers' default): one that holds more
    than tensors is refused with a ValueError naming the folder (torch's own message asks to turn the safe
    loader off).

    Raises:
        ValueError: the weights file holds pickled objects beyond tensors and plain data.
    """
    import pickle

    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(os.fspath(source), trust_remote_code=False, **kwargs)
    except pickle.UnpicklingError as e:
        held = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), type(e).__name__)
        raise ValueError(f"base model {os.fspath(source)!r}: its weights file holds more than tensors and plain "
                         f"data, which could run code when unpickled; refused ({held})") from e


RETROFIT_CONFIG = "retrofit.json"
RETROFIT_WEIGHTS = "retrofit_layers.safetensors"
FORMAT = "cl_arch.retrofit/1"


def save_retrofit(model: RetrofitModel, directory: Union[str, os.PathLike], base_name: Optional[str] = None) -> str:
    """Write the added layers of ``model`` and a config naming its base into ``directory``.

    Args:
        base_name: how to find the base again (a path or hub id); default the base config's
            ``name_or_path`` (what ``from_pretrained`` recorded). A local folder is also recorded
            as its absolute resolved path, so loading does not depend on the current folder.

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
    name = os.fspath(base_name) if base_name is not None else getattr(base.config, "_name_or_path", "") or ""
    base_fp = model.base_fingerprint()  # hashed once: the base's weights are most of the bytes
    meta = {
        "format": FORMAT, "cl_arch_version": __version__,
        "retrofit": model.config.to_dict(),
        "base": {"name_or_path": name, "path": os.path.realpath(name) if name and os.path.isdir(name) else None,
                 "model_type": base.config.model_type, "class": type(base).__name__, "fingerprint": base_fp},
        "fingerprint": retrofit_fingerprint(model.config, base_fp, model.fast),
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

    Everything is checked before the base is touched (the added tensors against the config, the base
    against the config and the recorded fingerprint, the whole against the retrofit's fingerprint),
    so on any error the base is left exactly as it was.

    Args:
        base: the base model (a ``transformers`` causal LM), a path/hub id to load it from with
            ``AutoModelForCausalLM.from_pretrained``, or None: the recorded folder (``path``), or a
            recorded hub id from the local Hugging Face cache only (never downloaded).
        map_location: where the added tensors are read to; the loaded model's memories sit on the base's device.

    Raises:
        FileNotFoundError: a file of the retrofit is missing; with ``base=None``, the recorded base
            folder (or hub id in the local cache) is not there (the path and fingerprint named).
        ValueError: a corrupt file; added tensors that do not fit; a base of another family or size,
            or one that already carries a retrofit; a base whose weights differ from the ones the
            layers were trained on (both fingerprints named).
    """
    directory = os.fspath(directory)
    meta = read_retrofit_config(directory)
    cfg = RetrofitConfig.from_dict(meta["retrofit"])
    want = meta["base"]
    fast = _load_fast(directory, cfg, map_location)
    source = "given"
    if base is None:
        base, source = _load_recorded_base(directory, want)
    elif not isinstance(base, nn.Module):
        source = f"loaded from {os.fspath(base)!r}"
        base = load_base_model(base)
    family = model_family(base)
    if family != cfg.family:
        raise ValueError(f"retrofit {directory} was made for a {cfg.family} model ({want.get('class')}), "
                         f"the base given is {family} ({type(base).__name__})")
    try:
        check_base(base, cfg)
    except ValueError as e:
        raise ValueError(f"retrofit {directory} does not fit the base {source}: {e}") from e
    have = base_fingerprint(base)
    if have != want["fingerprint"]:
        raise ValueError(f"retrofit {directory} was trained on the base {_recorded(want)} with weights fingerprint "
                         f"{want['fingerprint']}; the base {source} has fingerprint {have} (other or modified "
                         "weights): its added layers would mean nothing on it, refusing to load")
    fp = retrofit_fingerprint(cfg, have, fast)
    if meta.get("fingerprint") not in (None, fp):
        raise ValueError(f"retrofit {directory}: fingerprint {fp} differs from the recorded "
                         f"{meta['fingerprint']} (files modified or mixed up)")
    model = RetrofitModel(base, cfg, fast=fast)
    try:
        model.fast.to(model.device)
    except BaseException:
        model.unload()
        raise
    return model


def _load_fast(directory: str, cfg: RetrofitConfig, map_location: str) -> nn.ModuleDict:
    # The added memories built and filled apart from any base: a bad file fails here, before a hook exists.
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.path.join(directory, RETROFIT_WEIGHTS), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"corrupt retrofit weights in {directory}: {e}") from e
    fast = build_fast(cfg)
    expected = fast.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = sorted(n for n in tensors if n in expected and tensors[n].shape != expected[n].shape)
    if missing or unexpected or bad:
        raise ValueError(f"retrofit weights in {directory} do not fit its config: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {bad}")
    fast.load_state_dict(tensors)
    return fast


def _recorded(want: dict) -> str:
    where = want.get("path") or want.get("name_or_path") or ""
    return repr(where) if where else "(no path recorded)"


def _load_recorded_base(directory: str, want: dict):
    """The base a retrofit file names, read from this machine only, and how it was found.

    The recorded path and name are untrusted input: ``local_files_only`` (no download) and
    ``trust_remote_code=False``; nothing is written there.
    """
    fp = want.get("fingerprint")
    name, path = want.get("name_or_path") or "", want.get("path")
    pass_base = f"pass the base explicitly: load_retrofit({directory!r}, base=<the model or its folder>)"
    if not isinstance(name, str) or not (path is None or isinstance(path, str)):
        raise ValueError(f"corrupt retrofit config in {directory}: base name_or_path {name!r} / path {path!r} "
                         "are not strings")
    if path is not None:
        if not os.path.isabs(path):
            raise ValueError(f"corrupt retrofit config in {directory}: the recorded base path {path!r} is not "
                             f"absolute; {pass_base}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"retrofit {directory} was made on the base model in {path} (weights "
                                    f"fingerprint {fp}), which is not there: {pass_base}")
        source = path
    elif name:
        # Written before paths were recorded (a folder, relative to the current one) or a hub id.
        source = name
    else:
        raise ValueError(f"retrofit {directory} records no base path (weights fingerprint {fp}): {pass_base}")
    try:
        base = load_base_model(source, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... by cause
        if path is None and not os.path.isdir(source):
            raise FileNotFoundError(f"retrofit {directory} was made on the base {name!r} (weights fingerprint {fp}), "
                                    "which is neither a local folder nor in the local Hugging Face cache (a name "
                                    f"read from a retrofit file is never downloaded): {pass_base}") from e
        raise ValueError(f"retrofit {directory}: the recorded base folder {source} (weights fingerprint {fp}) "
                         f"could not be loaded ({type(e).__name__}: {e}); {pass_base}") from e
    return base, f"loaded from {source!r}"
