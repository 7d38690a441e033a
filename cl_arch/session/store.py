"""Saved sessions by user or task id (:class:`SessionStore`)."""
import os
import re
from typing import List, Union

from ..io import writing
from .core import Session
from .files import _read_file

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class SessionStore:
    """One saved session per user or task id, as ``<root>/<id>.session.safetensors``.

    Ids must match ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` and contain no ``..``: no separators, no
    absolute paths, nothing that resolves outside ``root``.
    """

    SUFFIX = ".session.safetensors"

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = os.path.realpath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)

    def path(self, uid: str) -> str:
        """File of ``uid``; ValueError for an invalid id."""
        if not isinstance(uid, str) or not _ID_RE.fullmatch(uid) or ".." in uid:
            raise ValueError(f"invalid session id {uid!r}: use 1-128 letters, digits, '_', '-', '.', "
                             "starting with a letter or digit, without '..'")
        p = os.path.realpath(os.path.join(self.root, uid + self.SUFFIX))
        if os.path.dirname(p) != self.root:
            raise ValueError(f"invalid session id {uid!r}: resolves outside {self.root}")
        return p

    def exists(self, uid: str) -> bool:
        """Whether ``uid`` has a saved session."""
        return os.path.isfile(self.path(uid))

    def ids(self) -> List[str]:
        """Stored ids, sorted."""
        return sorted(f[:-len(self.SUFFIX)] for f in os.listdir(self.root)
                      if f.endswith(self.SUFFIX) and not f.startswith("."))

    def open(self, model, uid: str, **kwargs) -> Session:
        """The saved session of ``uid``, or a new one (``Session(model, **kwargs)``) if none.

        The same call opens a new or a returning user: whatever is given in ``kwargs``
        (``adapt``, ``replay_size``, ``seed``, rule settings) applies to a stored session too,
        overriding what it was saved with; what is not given keeps its stored value. A smaller
        ``replay_size`` drops the stored session's lowest-scoring replay records (the buffer's own
        rule), for good once the session is saved again. ``adapt=False`` keeps the stored P
        (saved again as it is) but does not use it.
        """
        p = self.path(uid)
        try:
            # Read under the file's lock, after finishing an interrupted multi-file write of it
            # (undo writes session files that way), so a returning user gets the version it left.
            data = _read_file(p)
        except FileNotFoundError:
            return Session(model, **kwargs)
        return Session.from_bytes(model, data, source=p, **kwargs)

    def save(self, session: Session, uid: str) -> str:
        """Save atomically; returns the file path."""
        p = self.path(uid)
        session.save(p)
        return p

    def delete(self, uid: str) -> bool:
        """Remove ``uid``'s saved session; False if there was none.

        Under the file's lock, after finishing an interrupted multi-file write of it, so that no
        stale journal can bring the file back later."""
        p = self.path(uid)
        with writing([p]):
            if os.path.isfile(p):
                os.remove(p)
                return True
        return False
