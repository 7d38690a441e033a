"""``cl-arch serve``: an HTTP server where every user's model keeps learning (docs/serving.md).

* ``config.py``: :class:`ServeConfig` (limits), :class:`RequestError`, text <-> byte ids;
* ``store.py``: the :class:`Store` interface, :class:`SQLiteStore`; ``valkey_store.py``:
  :class:`ValkeyStore` (Redis/Valkey, leases for several processes); ``store_url.py``: :func:`open_store`;
* ``metrics.py``: counters, per-user reward curves, the Prometheus text;
* ``engine.py``: :class:`Engine`, the continuous-batching decode loop over per-user sessions;
* ``status.py``: the status page; ``app.py``: :func:`create_app`, the FastAPI app.

``app.py`` needs the ``serve`` extra (fastapi, uvicorn); the rest only the core.
"""
from .config import RequestError, ServeConfig
from .engine import Engine, Job, p_digest
from .store import SQLiteStore, Store
from .store_url import open_store

__all__ = ["Engine", "Job", "RequestError", "SQLiteStore", "ServeConfig", "Store", "open_store", "p_digest"]
