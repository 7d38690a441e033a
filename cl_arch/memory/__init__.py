"""Fast-weight memories, one module per kind, each with its config (docs/design.md, "Memories").

* :mod:`.base`: :class:`PlasticMemory` (``W0``, the resting state, the commit) and :class:`MemoryConfig`;
* :mod:`.commit`: how a memory commits, as strategy objects (:class:`TraceCommit`, :class:`StateCommit`);
* :mod:`.fast_layer`: the in-block fast-weight layer and :class:`FastLayerConfig`;
* :mod:`.output`: what the memories after the last block share (:class:`OutputContext`, :class:`OutputMemory`);
* :mod:`.readout`, :mod:`.episodic`, :mod:`.reward`, :mod:`.verdict`: the output memories.

A model lists its output memories in ``PlasticConfig.memories``; each config ``build``s its module.
A new kind is a config (a :class:`MemoryConfig` subclass with a ``kind``) and a module in one file;
``model.add_memory(config)`` adds it to a trained model.
"""
from .base import MEMORY_KINDS, MemoryConfig, PlasticMemory
from .commit import StateCommit, TraceCommit
from .episodic import EpisodicConfig, EpisodicMemory
from .fast_layer import FAST_LAYER_FIELDS, FastLayerConfig, FastWeightLayer, ShortConv
from .output import OutputContext, OutputMemory
from .readout import ReadoutConfig, ReadoutMemory
from .reward import RewardMemoryConfig
from .verdict import VerdictCommit, VerdictConfig, VerdictMemory

__all__ = ["MEMORY_KINDS", "MemoryConfig", "PlasticMemory", "StateCommit", "TraceCommit", "EpisodicConfig",
           "EpisodicMemory", "FAST_LAYER_FIELDS", "FastLayerConfig", "FastWeightLayer", "ShortConv", "OutputContext",
           "OutputMemory", "ReadoutConfig", "ReadoutMemory", "RewardMemoryConfig", "VerdictCommit", "VerdictConfig",
           "VerdictMemory"]
