"""What sessions, consolidation, training and evaluation need of a model and of its fast memories.

:class:`~cl_arch.PlasticTransformer` satisfies both protocols; a wrapper that retrofits fast
memories into another network (e.g. a Hugging Face model) satisfies them by providing the same
members, and then works with :class:`~cl_arch.Session` and :mod:`cl_arch.consolidate` unchanged.
Nothing outside ``cl_arch/model.py`` checks the concrete class.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

from .state import ModelState


@runtime_checkable
class FastMemory(Protocol):
    """One fast-weight memory of ``n_heads`` matrices ``[head_k_dim, head_v_dim]``.

    ``W0 [H, K, V]`` is its base memory; the state of an episode starts at, and decays toward,
    ``W0 + P``. It owns its commit (:meth:`commit`) and lists the settings that commit learns.
    """

    n_heads: int
    head_k_dim: int
    head_v_dim: int
    W0: torch.Tensor

    @property
    def state_dtype(self) -> torch.dtype: ...

    def initial_state(self, batch_size: int, P: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def commit(self, P: torch.Tensor, E: torch.Tensor, r=None, b=None, **overrides
               ) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def commit_rates(self) -> Dict[str, torch.Tensor]: ...

    def plasticity_parameters(self) -> Dict[str, torch.nn.Parameter]: ...


@runtime_checkable
class PlasticModel(Protocol):
    """A network with fast memories: ``logits, state = model(ids [B, T], state=..., modulation=...)``.

    ``fast_layers()`` lists its fast memories in state order (one ``P`` each); ``memories()`` maps
    every slot of ``ModelState.layers`` to its memory (None for an attention cache, an
    ``AttnLayerState``; batched decoding groups sessions by position when there is one).
    ``fingerprint()`` ties saved sessions and consolidation reports to the weights. Satisfied by
    :class:`~cl_arch.PlasticTransformer` and by ``cl_arch.hf.RetrofitModel`` (a transformers
    causal LM with fast memories added beside its attention; its slots are one KV cache per
    decoder block, then the added memories).
    """

    config: object  # has vocab_size and baseline_rho (the commit's default baseline step)

    @property
    def device(self) -> torch.device: ...

    def fast_layers(self) -> List[FastMemory]: ...

    def memories(self) -> List[Optional[FastMemory]]: ...

    def init_state(self, batch_size: int, P: Optional[Sequence[Optional[torch.Tensor]]] = None) -> ModelState: ...

    def materialize_state(self, state: ModelState, batch_size: Optional[int] = None) -> ModelState: ...

    def fingerprint(self) -> str: ...

    def commit(self, state: Union[ModelState, Sequence[Optional[torch.Tensor]]],
               P: Optional[Sequence[Optional[torch.Tensor]]] = None, reward=None, baseline=None, **kwargs
               ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]: ...

    def __call__(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                 modulation: Optional[torch.Tensor] = None, return_state: bool = True,
                 lam: Union[None, float, Sequence[Optional[float]]] = None
                 ) -> Tuple[torch.Tensor, Optional[ModelState]]: ...


__all__ = ["FastMemory", "PlasticModel"]
