"""The models every evaluation reads with: the shipped default model, a cached time-budgeted
pretraining recipe, and the same model without its readout memory."""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, List, Optional, Tuple

from cl_arch import PlasticConfig, PlasticTransformer

logger = logging.getLogger(__name__)


def demo_config() -> PlasticConfig:
    """The small default model: 4 layers (fast, attn, fast, attn), d=128, attention window 64, and
    a readout memory of 2 heads (``configs/default_model.yaml``'s model section).

    The short window bounds the cost of long streams and leaves what lies further back to the
    fast layers and the readout memory.
    """
    return PlasticConfig.from_name("demo")


DEMO_PRETRAIN_SECONDS = 150.0


def default_model(log=None) -> PlasticTransformer:
    """The model shipped in ``cl_arch/assets/default_model`` (:func:`cl_arch.load_default`), after
    logging where it comes from (its ``pretrain.json``: steps, validation bits/byte) through ``log``
    (default: this module's logger, at INFO).

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    import json

    from cl_arch import default_model_dir, load_default

    log = log or logger.info
    folder = default_model_dir()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no shipped default model in {folder}")
    info_path = os.path.join(folder, "pretrain.json")
    extra = ""
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        extra = f" ({info['steps']} steps, validation {info['final_val_bpb']:.3f} bits/byte)"
    log(f"loading the shipped default model from {folder}{extra}")
    return load_default()


def demo_pretrain_overrides(seconds: float = DEMO_PRETRAIN_SECONDS, seed: int = 0,
                            config: Optional[PlasticConfig] = None) -> List[Tuple[List[str], Any]]:
    """Settings of :func:`cl_arch.train.pretrain.pretrain` for the default model (over its defaults).

    ``cl-arch pretrain``'s defaults (stdlib minus :data:`~cl_arch.train.data.HELD_OUT_STDLIB`,
    AdamW 3e-3 with warmup and cosine) with :func:`demo_config` as the model, 1 KB sequences in
    batches of 8 (16x the attention window, as the shipped model) and a wall-clock budget of
    ``seconds`` as the stop (the cosine follows the clock, so the learning rate has decayed when
    the time is up, however fast the machine is).
    """
    model = (config or demo_config()).to_dict()
    seq = 1024 if config is None else 256
    return [(["model"], model), (["data", "seq_len"], seq), (["train", "batch_size"], 16 * 256 // seq),
            (["train", "max_minutes"], seconds / 60.0), (["train", "max_steps"], 5000),
            (["train", "eval_every"], 0), (["train", "val_blocks"], 32), (["train", "log_with"], "none"),
            (["train", "seed"], seed), (["train", "save_every"], 0), (["train", "keep_checkpoints"], 1)]


def default_cache_dir(seconds: float = DEMO_PRETRAIN_SECONDS, seed: int = 0,
                      config: Optional[PlasticConfig] = None) -> str:
    """``$CL_ARCH_CACHE`` or ``~/.cache/cl_arch`` + ``/demo-<hash>``: one folder per pretraining
    recipe (settings, library version, Python version whose stdlib is the corpus)."""
    import hashlib
    import json
    import sys

    import cl_arch

    key = json.dumps({"overrides": demo_pretrain_overrides(seconds, seed, config), "version": cl_arch.__version__,
                      "python": list(sys.version_info[:2])}, sort_keys=True, default=str)
    root = os.environ.get("CL_ARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cl_arch")
    return os.path.join(root, "demo-" + hashlib.sha1(key.encode()).hexdigest()[:10])


def stdlib_model(cache_dir: Optional[str] = None, seconds: Optional[float] = None, seed: int = 0,
                 config: Optional[PlasticConfig] = None, log=None, progress: bool = True) -> PlasticTransformer:
    """The shipped default model (:func:`default_model`) when called with no recipe (``seconds``,
    ``cache_dir`` and ``config`` all None, seed 0); otherwise load the recipe's model from
    ``cache_dir``, or pretrain it there first (``seconds`` None: 150).

    Pretraining is :func:`cl_arch.train.pretrain.pretrain` (accelerate) with
    :func:`demo_pretrain_overrides`: next-byte loss on the standard library's training split (the
    held-out packages are never read) for ``seconds`` of wall time. A time budget, not a step
    count, so the demo keeps to its few minutes on any machine; the cached checkpoint then fixes
    the result (its ``pretrain.json`` records steps and validation bits/byte).
    ``cache_dir=None``: :func:`default_cache_dir` (keyed by the recipe).
    """
    import json
    import shutil
    import tempfile

    log = log or logger.info
    if seconds is None and cache_dir is None and config is None and seed == 0:
        try:
            return default_model(log)
        except FileNotFoundError:
            pass
    seconds = DEMO_PRETRAIN_SECONDS if seconds is None else seconds
    cache_dir = cache_dir or default_cache_dir(seconds, seed, config)
    if os.path.isfile(os.path.join(cache_dir, "config.json")):
        info = {}
        if os.path.isfile(os.path.join(cache_dir, "pretrain.json")):
            with open(os.path.join(cache_dir, "pretrain.json")) as f:
                info = json.load(f)
        extra = f" ({info['steps']} steps, validation {info['final_val_bpb']:.3f} bits/byte)" if info else ""
        log(f"loading the pretrained model from {cache_dir}{extra}")
        return PlasticTransformer.from_pretrained(cache_dir).eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only
    from cl_arch.train.config import PretrainRunConfig, load_config
    from cl_arch.train.pretrain import pretrain

    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".pretrain-", dir=parent)
    try:
        cfg = load_config(PretrainRunConfig, None, demo_pretrain_overrides(seconds, seed, config) +
                          [(["train", "output_dir"], work), (["train", "progress"], progress)])
        log(f"pretraining the default model for {seconds:.0f}s (cl_arch.train.pretrain) on the standard library "
            f"minus its held-out packages; cached in {cache_dir}")
        res = pretrain(cfg)
        final = os.path.join(work, "final")
        with open(os.path.join(final, "pretrain.json"), "w") as f:
            json.dump({k: res[k] for k in ("steps", "final_val_bpb", "seconds", "tokens", "tokens_per_s", "stopped")},
                      f, indent=1)
        if os.path.isdir(cache_dir):  # a stale or partial folder without a model
            shutil.rmtree(cache_dir)
        os.replace(final, cache_dir)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PlasticTransformer.from_pretrained(cache_dir).eval()


def without_memories(model: PlasticTransformer, readout: bool = True, episodic: bool = False) -> PlasticTransformer:
    """A copy of ``model`` without its readout memory (``readout``) and/or its episodic memory
    (``episodic``) (``model.remove_memory`` on a copy): the same weights otherwise, to tell one
    memory's share of a gain from the rest's."""
    drop = [name for name, flag in (("readout", readout), ("episodic", episodic)) if flag and model.memory(name) is not None]
    if not drop:
        return model
    m = copy.deepcopy(model)
    for name in drop:
        m.remove_memory(name)
    return m.eval()


def without_readout(model: PlasticTransformer) -> PlasticTransformer:
    """A copy of ``model`` with its readout memory removed: the network, its in-block fast layers
    (and episodic memory, if any) alone, to tell the readout memory's share of a gain from theirs."""
    return without_memories(model, readout=True)


def without_episodic(model: PlasticTransformer) -> PlasticTransformer:
    """A copy of ``model`` with its episodic memory removed (everything else the same weights)."""
    return without_memories(model, readout=False, episodic=True)


def text_model(model: Optional[PlasticTransformer] = None, cache_dir: Optional[str] = None,
               pretrain_seconds: Optional[float] = None, no_readout: bool = False,
               no_episodic: bool = False) -> PlasticTransformer:
    """The model a text benchmark reads with: ``model``, or when None :func:`stdlib_model`
    (``cache_dir``, ``pretrain_seconds``); without its readout and/or episodic memory when asked
    (:func:`without_memories`)."""
    if model is None:
        model = stdlib_model(cache_dir, seconds=pretrain_seconds)
    if no_readout or no_episodic:
        model = without_memories(model, readout=no_readout, episodic=no_episodic)
    return model


def recall_model(steps: int = 600, cache_root: str = "runs", seed: int = 0) -> PlasticTransformer:
    """A model trained on associative recall (:func:`cl_arch.train.recall.train_recall_model`),
    cached in ``<cache_root>/recall-model-<steps>-<seed>`` (docs/design.md, "Measuring learning":
    never test learning on a fresh model)."""
    from cl_arch.train.recall import train_recall_model

    path = os.path.join(cache_root, f"recall-model-{steps}-{seed}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return PlasticTransformer.from_pretrained(path).eval()
    model = train_recall_model(steps=steps, seed=seed, log=logger.info)
    model.save_pretrained(path)
    return model.eval()


__all__ = ["demo_config", "DEMO_PRETRAIN_SECONDS", "default_model", "demo_pretrain_overrides", "default_cache_dir",
           "stdlib_model", "text_model", "without_readout", "without_episodic", "without_memories", "recall_model"]
