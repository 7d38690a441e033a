"""Data parallelism for the training loops: one process, DDP, or FSDP version 2 (``fully_shard``).

``accelerate launch`` starts the processes and forms the process group (NCCL on GPUs, gloo on
CPU); configs for each case are in ``configs/accelerate/``. What this module decides is how the
model is spread over them (:func:`resolve_plan`):

- ``single``: one process, nothing to do.
- ``ddp``: every process holds the whole model; ``accelerator.prepare`` wraps it in DDP for
  pretraining and fine-tuning, and meta-training averages gradients with one all-reduce
  (:func:`all_reduce_grads`; DDP's wrapper expects one forward per backward, and a meta step runs
  dozens).
- ``fsdp``: :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` itself, one unit per
  block, then the root. It does so on every device: accelerate 1.15 silently drops an FSDP config
  on CPU (it forms a gloo group and would wrap in DDP), and its own FSDP2 preparation can ignore
  whole modules but not single parameters, which is what the fast memories need (next paragraph).
  The settings still come from the accelerate config (``FSDP_*`` variables set by ``accelerate
  launch``) unless ``train.parallel`` says otherwise.

**What stays replicated.** The commit between episodes (``PlasticMemory.commit``, meta-training's
and episodic fine-tuning's ``commit_persistent``) reads each memory's per-head settings
(``lam_logit, gamma_logit, eta_s, eta_r``; the readout's state commit reads ``A_log``) *outside*
any forward pass, where FSDP leaves parameters sharded. :func:`replicated_parameters` therefore
keeps every fast memory's own one-dimensional parameters (``[H]`` per-head vectors: a few floats per
layer) whole on every process (``fully_shard(ignored_params=...)``), and :func:`all_reduce_grads`
averages their gradients, which FSDP does not reduce. ``W0 [H, K, V]`` and every projection are
sharded; they are only read inside a forward, where FSDP gathers them. The fast states ``S, E, P``
``[B, H, K, V]`` are activations of each process's own rows and are never sharded.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List

import torch

PARALLEL = ("auto", "ddp", "fsdp")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")


@dataclass(frozen=True)
class ParallelPlan:
    """How one run spreads its model: ``mode`` ("single" | "ddp" | "fsdp"), ``world`` processes,
    the training-checkpoint format ("full" | "sharded"), FSDP's ``reshard_after_forward`` and
    whether the accelerate config asked for activation checkpointing."""

    mode: str
    world: int
    checkpoint_format: str = "full"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp"


_TEARDOWN_REGISTERED = False


def destroy_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, once per process.

    A gloo group left to interpreter teardown can abort a rank with "terminate called without an
    active exception" (SIGABRT; seen with torch 2.13 and accelerate 1.16 on 2 CPU processes under
    load), failing a run that finished. The loops do not destroy the group themselves: a later run
    in the same process (a fine-tune after a pretrain) needs it."""
    global _TEARDOWN_REGISTERED
    if _TEARDOWN_REGISTERED:
        return
    import atexit

    def teardown():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(teardown)
    _TEARDOWN_REGISTERED = True


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def resolve_plan(parallel: str, checkpoint_format: str, world: int) -> ParallelPlan:
    """The plan of a run of ``world`` processes.

    Args:
        parallel: ``train.parallel``: "auto" (FSDP when ``accelerate launch`` was given an FSDP
            config, i.e. ``ACCELERATE_USE_FSDP=true``; else DDP), "ddp" or "fsdp".
        checkpoint_format: ``train.checkpoint_format``: "auto" (sharded when FSDP runs with
            ``fsdp_state_dict_type: SHARDED_STATE_DICT``, else full), "full" or "sharded".

    Raises:
        ValueError: an unknown choice, FSDP version 1 requested, or sharded checkpoints without FSDP.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"train.parallel: must be one of {list(PARALLEL)}, got {parallel!r}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"train.checkpoint_format: must be one of {list(CHECKPOINT_FORMATS)}, "
                         f"got {checkpoint_format!r}")
    fsdp = parallel == "fsdp" or (parallel == "auto" and _env_flag("ACCELERATE_USE_FSDP"))
    if fsdp and os.environ.get("FSDP_VERSION", "2").strip() != "2":
        raise ValueError(f"FSDP version {os.environ['FSDP_VERSION']} requested by the accelerate config: cl_arch "
                         "shards with FSDP version 2 only (set fsdp_version: 2)")
    # One process has nothing to shard over (and no process group to shard with).
    mode = "single" if world == 1 else ("fsdp" if fsdp else "ddp")
    if checkpoint_format == "auto":
        sharded = os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT").upper() == "SHARDED_STATE_DICT"
        checkpoint_format = "sharded" if mode == "fsdp" and sharded else "full"
    if checkpoint_format == "sharded" and mode != "fsdp":
        raise ValueError(f"train.checkpoint_format: 'sharded' needs FSDP over several processes, this run is "
                         f"{mode!r} with {world} process(es); use 'full'")
    return ParallelPlan(mode, world, checkpoint_format, _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                        mode == "fsdp" and _env_flag("FSDP_ACTIVATION_CHECKPOINTING"))


def replicated_parameters(model) -> List[torch.nn.Parameter]:
    """Every fast memory's own one-dimensional parameters (``[H]`` per-head vectors), which the
    commit reads outside a forward pass and which therefore stay whole under FSDP."""
    out, seen = [], set()
    for memory in model.fast_layers():
        for p in memory.parameters(recurse=False):
            if p.dim() <= 1 and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def shard_model(model, plan: ParallelPlan):
    """Apply ``fully_shard`` in place: each block, then the root (embedding, final norm, head and
    the readout memory). Returns ``model``, now an ``FSDPModule`` whose sharded parameters are
    DTensors; :func:`replicated_parameters` stay plain tensors.

    Call after the process group exists (``Accelerator()``) and before the optimizer is built.
    """
    if not plan.fsdp:
        return model
    from torch.distributed.fsdp import fully_shard

    keep = set(replicated_parameters(model))
    # fully_shard replaces each sharded parameter by a new DTensor parameter; attributes set on the
    # old one (``_no_weight_decay``, read by the optimizer's grouping) would be lost.
    no_decay = [n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)]
    # FSDP warns that a unit returns a view: Block.forward and the model only ever add to their
    # outputs out of place (x = x + h), which is the case the warning says is safe.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=plan.reshard_after_forward,
                    ignored_params=keep & set(block.parameters()))
    fully_shard(model, reshard_after_forward=plan.reshard_after_forward, ignored_params=keep)
    params = dict(model.named_parameters())
    for name in no_decay:
        params[name]._no_weight_decay = True
    return model


def is_sharded(model) -> bool:
    """True when ``model`` went through ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def all_reduce_grads(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of ``params`` over the ``world`` processes with one all-reduce.

    A parameter whose gradient is None on every process keeps None (AdamW then skips it, as one
    process would); None on some processes only counts as zeros there. Every process must pass the
    same parameters in the same order.
    """
    if world <= 1:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global 2-norm is at most ``max_norm``; returns the norm before.

    With no DTensor gradient this is ``torch.nn.utils.clip_grad_norm_``. Under FSDP the gradients
    mix DTensor shards and the replicated plain tensors, which torch's version cannot stack: the
    shards' squared norms are summed over processes, the replicated ones (equal everywhere after
    :func:`all_reduce_grads`) counted once.
    """
    from torch.distributed.tensor import DTensor

    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    import torch.distributed as dist

    local = [g.to_local() if isinstance(g, DTensor) else None for g in grads]
    device = next(t for t in local if t is not None).device
    sharded_sq = torch.zeros((), dtype=torch.float32, device=device)
    replicated_sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, t in zip(grads, local):
        if t is not None:
            sharded_sq += t.float().pow(2).sum()
        else:
            replicated_sq += g.float().pow(2).sum()
    dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
    total = (sharded_sq + replicated_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's formula
    for g, t in zip(grads, local):
        (t if t is not None else g).mul_(coef.to(g.dtype))
    return total


def gathered_state_dict(model) -> Dict[str, torch.Tensor]:
    """The whole model's state dict on CPU: every tensor on process 0, ``{}`` on the others under
    FSDP (a collective: every process calls it); ``model.state_dict()`` otherwise."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model(model, rank: int):
    """A plain ``PlasticTransformer`` holding ``model``'s whole weights on process 0 (None on the
    others) for ``save_pretrained``; ``model`` itself when it is not sharded. A collective under
    FSDP."""
    if not is_sharded(model):
        return model
    sd = gathered_state_dict(model)
    if rank != 0:
        return None
    from cl_arch import PlasticTransformer

    copy = PlasticTransformer(model.config)
    copy.load_state_dict(sd)
    copy.check_inputs = True
    return copy


def save_final(model, directory: str, rank: int) -> None:
    """``save_pretrained`` of the (possibly sharded) model into ``directory`` by process 0; every
    process must call it under FSDP (the weights are gathered)."""
    whole = full_model(model, rank)
    if whole is not None and rank == 0:
        whole.save_pretrained(directory)


def load_full_weights(model, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy a full state dict (``save_pretrained`` tensors, tied ``lm_head`` dropped) into a sharded
    model: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tensors = dict(tensors)
    if model.config.tie_embeddings and "lm_head.weight" not in tensors and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state_by_name(model, optimizer, full: bool) -> Dict[str, Any]:
    """The optimizer state keyed by parameter names (``torch.distributed.checkpoint.state_dict``):
    ``full`` gathers it whole on process 0 (``{}`` elsewhere), else each process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full,
                                                                                cpu_offload=full))


def load_optimizer_state_by_name(model, optimizer, state: Dict[str, Any], full: bool) -> None:
    """Inverse of :func:`optimizer_state_by_name` (``full``: every process passes the whole state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a trainable parameter that never received a gradient (the readout's lam under
    # its state commit) has no saved state, and AdamW gives it none until it does.
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=full, strict=False))


def optimizer_state_ids_to_names(model, optimizer, state: Dict[str, Any]) -> Dict[str, Any]:
    """A plain ``optimizer.state_dict()`` (parameters numbered in group order) re-keyed by parameter
    name, so a checkpoint written by one process or DDP resumes under FSDP. ``optimizer`` must have
    been built the same way (same groups, same order), which :func:`~cl_arch.train.pretrain.param_groups`
    guarantees for one model and one set of trainable parameters."""
    # First name of each tensor (tied lm_head.weight is embed.weight), as the state-dict API keys it.
    names = {id(p): n for n, p in model.named_parameters()}
    index_to_name: Dict[int, str] = {}
    groups = []
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint optimizer has {len(state['param_groups'])} parameter groups, this run "
                         f"{len(optimizer.param_groups)}: the trainable parameters differ")
    for saved, live in zip(state["param_groups"], optimizer.param_groups):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError("checkpoint optimizer groups do not match this run's trainable parameters")
        fqns = [names[id(p)] for p in live["params"]]
        index_to_name.update(zip(saved["params"], fqns))
        groups.append({**saved, "params": fqns})
    return {"state": {index_to_name[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def sharded_save(directory: str, model, optimizer) -> None:
    """Every process writes its shards of the weights and optimizer state into ``directory``
    (``torch.distributed.checkpoint``; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": optimizer_state_by_name(model, optimizer, False)}
    dcp.save(state, checkpoint_id=directory)


def sharded_load(directory: str, model, optimizer=None) -> None:
    """Read :func:`sharded_save`'s shards into an identically sharded model (and optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state: Dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # A fresh optimizer's state dict names every trainable parameter, but a parameter that never
        # got a gradient (the readout's lam under its state commit) has no saved state: that part
        # may be missing. Every weight must be there.
        state["optimizer"] = optimizer_state_by_name(model, optimizer, False)
    saved = FileSystemReader(directory).read_metadata().state_dict_metadata
    missing = sorted(f"model.{k}" for k in state["model"] if f"model.{k}" not in saved)
    if missing:
        raise ValueError(f"sharded checkpoint {directory} does not fit the model: missing {missing[:5]}")
    dcp.load(state, checkpoint_id=directory, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        load_optimizer_state_by_name(model, optimizer, state["optimizer"], False)


def split_rows(n: int, rank: int, world: int, what: str) -> slice:
    """This process's contiguous share of ``n`` rows (``n`` must divide evenly: equal shares keep
    the mean of per-process means equal to the global mean). Raises ValueError naming ``what``."""
    if n % world != 0:
        raise ValueError(f"{what}={n} is not divisible by {world} processes")
    share = n // world
    return slice(rank * share, (rank + 1) * share)


def padded_batches(n_rows: int, world: int, batch_size: int) -> int:
    """Batches each process runs over its ``ceil(n_rows / world)`` rows: equal on every process, as
    FSDP's gathers inside each forward require."""
    return math.ceil(math.ceil(n_rows / world) / batch_size)


__all__ = ["PARALLEL", "CHECKPOINT_FORMATS", "ParallelPlan", "resolve_plan", "replicated_parameters", "shard_model",
           "is_sharded", "all_reduce_grads", "clip_grad_norm", "gathered_state_dict", "full_model", "save_final",
           "load_full_weights", "optimizer_state_by_name", "load_optimizer_state_by_name",
           "optimizer_state_ids_to_names", "sharded_save", "sharded_load", "split_rows", "padded_batches"]
