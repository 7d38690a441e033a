"""Decoding on state buffers allocated once (issue 26): :class:`Decoder`, a whole-model one-token step
that updates every state in place, optionally one ``torch.compile`` graph (docs/design.md, "Decoding").

    decoder.py  the Decoder: buffers, prefill, step, state() / load_state() to and from ModelState
    slots.py    one token of each kind of state slot (fast layer, attention ring, readout, episodic, verdict)
"""
from .decoder import Decoder, default_active

__all__ = ["Decoder", "default_active"]
