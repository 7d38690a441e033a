"""``cl-arch finetune --hf-model PATH``: retrofit fast memories into a transformers causal LM and
train them on text episodes (:mod:`cl_arch.train.finetune_hf`).

    cl-arch finetune --hf-model my_llama/ --retrofit-layers 2 5 --fast-heads 8 --episodes 4 --max-minutes 10
    cl-arch finetune --hf-model my_llama/ --retrofit-from runs/finetune_hf/retrofit --trainable plasticity

The base model's weights are never trained or written; the added layers are saved in
``<output-dir>/retrofit`` (load them with ``cl_arch.hf.load_retrofit``). ``--trainable``: ``fast``
(the added layers), ``plasticity`` (their lam/gamma/eta_s/eta_r) or ``all`` (both; the default).
"""
import json
import os
from typing import Dict


def add_hf_args(p) -> None:
    """The flags only ``--hf-model`` runs read (the shared ones come from ``cl-arch finetune``)."""
    g = p.add_argument_group("transformers model (--hf-model)")
    g.add_argument("--hf-model", help="folder of a transformers causal LM: retrofit and train fast memories in it")
    g.add_argument("--retrofit-from", help="continue a saved retrofit (folder written by save_retrofit)")
    g.add_argument("--retrofit-layers", type=int, nargs="+", help="decoder blocks to retrofit (default: all)")
    g.add_argument("--fast-heads", type=int, help="heads per added memory")
    g.add_argument("--fast-head-dim", type=int, help="K = V per head")
    g.add_argument("--fast-rule", action="append", default=[], metavar="KEY=VALUE",
                   help="retrofit rule setting, e.g. --fast-rule eta_s=1.0 (repeatable)")


# cl-arch finetune flag -> HFFinetuneConfig field
FLAGS: Dict[str, str] = {"output_dir": "output_dir", "max_steps": "max_steps", "max_minutes": "max_minutes",
                         "batch_size": "batch_size", "lr": "lr", "seed": "seed", "sources": "sources",
                         "seq_len": "seq_len", "trainable": "trainable", "episodes": "episodes",
                         "retrofit_from": "retrofit_from", "retrofit_layers": "layers", "fast_heads": "n_heads",
                         "resume": "resume"}


def config_from_args(args):
    """Parsed flags -> :class:`HFFinetuneConfig` (ValueError naming a bad setting)."""
    from cl_arch.train.config import parse_override
    from cl_arch.train.finetune_hf import HFFinetuneConfig, config_from_dict

    for flag in ("config", "init_from"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --hf-model runs")
    d = {"hf_model": args.hf_model}
    for attr, key in FLAGS.items():
        v = getattr(args, attr, None)
        if v is not None:
            d[key] = v[0] if attr == "sources" and len(v) == 1 else v
    if getattr(args, "fast_head_dim", None):
        d["head_k_dim"] = d["head_v_dim"] = args.fast_head_dim
    rule = dict(HFFinetuneConfig.__dataclass_fields__["rule"].default_factory())
    for text in args.fast_rule:
        if "=" not in text:
            raise ValueError(f"--fast-rule expects KEY=VALUE, got {text!r}")
        k, v = text.split("=", 1)
        rule[k.strip()] = parse_override(f"x={v}")[1]
    d["rule"] = rule
    return config_from_dict(d)


def _cached_on_hub(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (ImportError, ValueError):  # HFValidationError (a ValueError): not even a valid repo id
        return False


def run_hf(args) -> int:
    from cl_arch.train.finetune_hf import dump, finetune_hf

    from .common import check_writable_folder, refuse_overwrite

    # A hub id is read from the local cache only: a mistyped folder fails at once instead of after
    # minutes of retries against an unreachable hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = config_from_args(args)  # ValueError naming the setting: one line from cli.py, exit 2
    if not os.path.exists(cfg.hf_model) and not _cached_on_hub(cfg.hf_model):
        raise FileNotFoundError(f"--hf-model {cfg.hf_model}: no such folder, nor a hub model in the local cache")
    if cfg.output_dir:
        # The run replaces <output-dir>/retrofit: a base or retrofit read from there would be lost.
        refuse_overwrite([("--output-dir", cfg.output_dir)],
                         [("--hf-model", cfg.hf_model if os.path.exists(cfg.hf_model) else None),
                          ("--retrofit-from", cfg.retrofit_from)], args.in_place, contain=True)
        if not args.print_config:
            check_writable_folder("--output-dir", cfg.output_dir)
    if args.print_config:
        import dataclasses

        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    results = finetune_hf(cfg, log=None if not args.no_progress else (lambda s: None))
    print(dump({k: results[k] for k in ("steps", "seconds", "tokens_per_second", "val_loss_before", "val_loss_after")}))
    return 0
