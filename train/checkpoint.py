"""Training checkpoints: the model as ``save_pretrained`` writes it, plus everything needed to
continue the run bit for bit.

Layout of one checkpoint folder (``<output_dir>/checkpoints/step_000123/``)::

    model.safetensors, config.json    PlasticTransformer.save_pretrained (loadable on its own)
    training_state.pt                 optimizer + schedule state, step, data position, elapsed
                                      time, the run config (torch.save, tensors and plain data)
    rng_state_<rank>.pt               python / numpy / torch (/ cuda) RNG states of each process

Under FSDP (:mod:`cl_arch.train.distributed`) a checkpoint is written in one of two formats
(``training_state.pt`` records which):

- ``full``: the weights are gathered on process 0 and written as above, and the optimizer state
  whole, keyed by parameter name (``optimizer_by_name``). It resumes under any number of
  processes, FSDP or not; a checkpoint of one process or DDP resumes under FSDP as well.
- ``sharded``: every process writes its own shards of the weights and optimizer state into
  ``sharded/`` (``torch.distributed.checkpoint``); no gather, no full copy in any process's memory.
  It resumes under FSDP (DCP re-shards when the number of processes changes).

The folder is first written as ``.tmp-step_...`` and moved into place when complete, under a
journal (:func:`cl_arch.io.commit_moves`) when it replaces an older folder of the same name: a
crash at any moment leaves the old checkpoint or the new one, and the loaders (``load_checkpoint``,
``find_latest``) finish an interrupted replacement before reading. ``find_latest`` only considers
complete folders.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from cl_arch.io import commit_moves, fsync_file, reading, recover

TRAINING_STATE = "training_state.pt"
SHARDED_DIR = "sharded"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> Dict[str, Any]:
    """Every RNG a training step may draw from (numpy's as plain lists so ``weights_only`` loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    # random.setstate wants nested tuples; torch.load gives them back as saved (tuples) but be lenient.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(directory: str, model, optimizer, schedule, training: Dict[str, Any],
                    accelerator=None, sharded: bool = False, write_weights=None) -> str:
    """Write a checkpoint folder (see the module docstring); every process calls this.

    Args:
        model: the (unwrapped) :class:`~cl_arch.PlasticTransformer`, sharded or not.
        optimizer: a torch optimizer (or accelerate's wrapper).
        schedule: an object with ``state_dict()`` (e.g. :class:`~cl_arch.train.pretrain.WarmupCosine`).
        training: plain data: step, data position, elapsed seconds, config dict, ...
        sharded: write the ``sharded`` format (the model must be sharded with ``fully_shard``).
        write_weights: ``write(model, folder)`` for a model without ``save_pretrained`` (a
            retrofit writes its added layers); read back by ``load_checkpoint(read_weights=...)``.

    Returns:
        ``directory``.
    """
    from . import distributed as dist_utils

    fsdp = dist_utils.is_sharded(model)
    if sharded and not fsdp:
        raise ValueError("save_checkpoint(sharded=True) needs a model sharded with fully_shard")
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator is None or accelerator.is_main_process
    parent, name = os.path.split(os.path.abspath(directory))
    tmp = os.path.join(parent, f".tmp-{name}")
    if is_main:
        recover(directory)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    if sharded:  # every process writes its shards; nothing is gathered
        dist_utils.sharded_save(os.path.join(tmp, SHARDED_DIR), model, opt)
        state = {"format": "sharded"}
    elif fsdp:  # gathered on process 0 (collectives: every process takes part)
        whole = dist_utils.full_model(model, rank)
        state = {"format": "full", "optimizer_by_name": dist_utils.optimizer_state_by_name(model, opt, full=True)}
        if is_main:
            whole.save_pretrained(tmp)
    else:
        state = {"format": "full", "optimizer": opt.state_dict()}
        if is_main and write_weights is not None:
            write_weights(model, tmp)
        elif is_main:
            model.save_pretrained(tmp)
    if is_main:
        torch.save({**state, "schedule": schedule.state_dict(), **training}, os.path.join(tmp, TRAINING_STATE))
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        for root, _, files in os.walk(tmp):  # torch.save does not sync; the journal must only name whole files
            for name_ in files:
                fsync_file(os.path.join(root, name_))
        old = os.path.join(parent, f".old-{name}")
        if os.path.lexists(old):
            shutil.rmtree(old)
        # Replacing a folder takes two renames (old aside, new in); the journal makes them one commit.
        moves = ([(directory, old)] if os.path.exists(directory) else []) + [(tmp, directory)]
        commit_moves(directory, moves, discard=[old])
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return directory


def load_checkpoint(directory: str, model, optimizer=None, schedule=None, rank: int = 0,
                    restore_rng: bool = True, read_weights=None) -> Dict[str, Any]:
    """Restore weights (in place, keeping the model's dtype/device), optimizer, schedule and RNG.

    Returns:
        the ``training`` dict given to :func:`save_checkpoint` (step, data position, ...).

    ``read_weights(folder, model)`` reads what ``save_checkpoint(write_weights=...)`` wrote.

    Every process calls it; a sharded model (``fully_shard``) receives its own shards. Call it
    before ``accelerator.prepare`` (DDP) and after :func:`~cl_arch.train.distributed.shard_model`.

    The files are read holding the folder's lock shared (:func:`cl_arch.io.reading`), so a
    concurrent ``save_checkpoint`` of the same folder is seen whole or not at all, and
    ``training_state.pt`` / ``rng_state_<rank>.pt`` are read with ``weights_only=True``: tensors
    and plain data only, never pickled code.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the weights do not fit ``model``, a sharded checkpoint meets an unsharded model,
            or a ``.pt`` file holds anything but tensors and plain data (the file is named).
    """
    from . import distributed as dist_utils

    # One hold of the folder's lock (shared: every rank reads at once) for all its files, after
    # finishing a save_checkpoint that a crash interrupted, so every file is of one checkpoint.
    with reading(directory):
        path = os.path.join(directory, TRAINING_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"not a training checkpoint: {path} is missing")
        state = _load_plain(path, "training state")
        fsdp = dist_utils.is_sharded(model)
        opt = None
        if optimizer is not None:
            opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        if state.get("format", "full") == "sharded":
            if not fsdp:
                raise ValueError(f"{directory} is a sharded checkpoint (one file set per FSDP process): resume it "
                                 "under FSDP (train.parallel: fsdp, several processes)")
            dist_utils.sharded_load(os.path.join(directory, SHARDED_DIR), model, opt)
        else:
            if fsdp:
                from cl_arch.model import WEIGHTS_NAME

                dist_utils.load_full_weights(model, _load_safetensors(os.path.join(directory, WEIGHTS_NAME)))
            else:
                (read_weights or load_weights)(directory, model)
            if opt is not None:
                if "optimizer_by_name" in state:
                    dist_utils.load_optimizer_state_by_name(model, opt, state["optimizer_by_name"], full=True)
                elif fsdp:  # written by one process or DDP: numbered parameters, re-keyed by name
                    named = dist_utils.optimizer_state_ids_to_names(model, opt, state["optimizer"])
                    dist_utils.load_optimizer_state_by_name(model, opt, named, full=True)
                else:
                    opt.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        if restore_rng:
            rng_path = os.path.join(directory, f"rng_state_{rank}.pt")
            if os.path.isfile(rng_path):
                rng = _load_plain(rng_path, "RNG state")
                try:
                    set_rng_state(rng)
                except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                    raise ValueError(f"corrupt RNG state {rng_path}: {e!r}") from e
    return {k: v for k, v in state.items() if k not in ("optimizer", "optimizer_by_name", "schedule", "format")}


def _load_plain(path: str, what: str) -> Any:
    """``torch.load`` of tensors and plain data only: a checkpoint file never runs code when read.

    Raises:
        ValueError: the file holds anything else (a pickled object, e.g. one that reduces to
            ``os.system``), or is not a torch file; the file is named.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long and suggests turning the safe loader off; keep only the line that
        # says what the file holds ("unsupported GLOBAL posix.system ...").
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        what_held = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else repr(e))
        raise ValueError(f"refusing to load the {what} {path}: it holds more than tensors and plain data, "
                         f"which could run code when unpickled ({what_held})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"corrupt {what} {path}: {e}") from e


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors, with an error that names the file."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a cl_arch checkpoint: {path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError type
        raise ValueError(f"corrupt checkpoint weights {path}: {e}") from e


def load_weights(directory: str, model) -> None:
    """Copy a ``save_pretrained`` folder's tensors into ``model`` in place (tied weights kept).

    Raises:
        FileNotFoundError / ValueError: missing file, or tensors that do not match the model.
    """
    from cl_arch.model import WEIGHTS_NAME

    w_path = os.path.join(directory, WEIGHTS_NAME)
    tensors = _load_safetensors(w_path)
    expected = model._export_tensors()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {w_path} does not fit the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():
            if name in tensors:
                if tensors[name].shape != p.shape:
                    raise ValueError(f"checkpoint {w_path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                     f"the model {tuple(p.shape)}")
                p.copy_(tensors[name])


def find_latest(checkpoint_root: str) -> Optional[str]:
    """Newest complete ``step_N`` folder under ``checkpoint_root`` (None if there is none)."""
    if not os.path.isdir(checkpoint_root):
        return None
    for name in os.listdir(checkpoint_root):  # finish replacements a crash interrupted
        if name.startswith(".step_") and name.endswith(".journal"):
            recover(os.path.join(checkpoint_root, name[1:-len(".journal")]))
    best, best_step = None, -1
    for name in os.listdir(checkpoint_root):
        m = _STEP_DIR.match(name)
        full = os.path.join(checkpoint_root, name)
        if m and os.path.isfile(os.path.join(full, TRAINING_STATE)) and int(m.group(1)) > best_step:
            best, best_step = full, int(m.group(1))
    return best


def prune_checkpoints(checkpoint_root: str, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step_N`` folders (keep = 0 keeps everything)."""
    if keep <= 0 or not os.path.isdir(checkpoint_root):
        return
    steps = sorted((int(m.group(1)), n) for n in os.listdir(checkpoint_root) if (m := _STEP_DIR.match(n)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(checkpoint_root, name), ignore_errors=True)
