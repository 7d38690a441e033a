"""``cl-arch serve``: an HTTP server where every user's model keeps learning (docs/serving.md).

OpenAI-compatible ``POST /v1/completions`` (``user`` names the session), rewards at
``POST /v1/sessions/{id}/reward``, continuous batching over users, commits stored in SQLite
before they are acknowledged. Needs the ``serve`` extra: ``pip install -e ".[serve]"``.
"""
import json
import os

from .common import add_model_arg, load_model


def add_parser(sub):
    p = sub.add_parser("serve", help="HTTP server: completions and rewards, every user's memory adapting",
                       description=__doc__.split("\n\n", 1)[1])
    add_model_arg(p)
    p.add_argument("--store", default="cl_arch_sessions.db",
                   help="session store URL: sqlite:///path.db or a plain path (default: ./cl_arch_sessions.db), or "
                        "redis://host:port/db (or valkey://...; ?lease_ms=N) for several servers sharing users")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-adapt", action="store_true", help="frozen control: sessions never change P")
    p.add_argument("--tokens", default=None,
                   help='JSON file {"<bearer token>": ["id", ...] or "*"}: requests need a token bound to their id')
    p.add_argument("--max-batch", type=int, default=64, help="most completions decoding at once")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=8192)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--max-queue", type=int, default=1024, help="most requests waiting, all users")
    p.add_argument("--max-user-queue", type=int, default=16, help="most requests waiting, one user")
    p.add_argument("--max-sessions", type=int, default=4096, help="sessions held in memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the decode loop")
    p.add_argument("--decoder", choices=["auto", "eager", "compile", "none"], default="auto",
                   help="how sessions decode: a decoder holding each batch's states between steps (auto: eager "
                        "where it applies; compile: compiled), or none (a forward per step)")
    p.set_defaults(func=run)


def read_tokens(path: str) -> dict:
    """The ``--tokens`` file: token -> list of session ids, or ``"*"``; ValueError naming what is wrong."""
    with open(path) as f:
        try:
            tokens = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--tokens {path}: not JSON ({e})") from None
    if not isinstance(tokens, dict) or not tokens:
        raise ValueError(f"--tokens {path}: must be a non-empty JSON object of token -> ids")
    for k, v in tokens.items():
        if len(k) < 16:
            raise ValueError(f"--tokens {path}: token {k[:4]!r}... is shorter than 16 characters")
        if v != "*" and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ValueError(f"--tokens {path}: the ids of a token must be a list of strings or \"*\"")
    return tokens


def run(args) -> int:
    try:
        import uvicorn

        from cl_arch.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"cl-arch serve needs the serve extra ({e.name} is missing): "
                         "pip install -e \".[serve]\"") from None
    from cl_arch.serve import Engine, ServeConfig, open_store

    tokens = read_tokens(args.tokens) if args.tokens else None
    config = ServeConfig(adapt=not args.no_adapt, max_batch=args.max_batch, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes,
                         max_queue=args.max_queue, max_user_queue=args.max_user_queue,
                         max_sessions=args.max_sessions, threads=args.threads,
                         decoder=None if args.decoder == "none" else args.decoder)
    store = open_store(args.store)
    model = load_model(args.model)
    name = "default" if args.model in (None, "default") else os.path.basename(os.path.normpath(args.model))
    app = create_app(Engine(model, store, config), tokens=tokens, model_name=name)
    print(f"cl-arch serve: http://{args.host}:{args.port}/ (model {name}, store {args.store}, "
          f"adapt {'on' if config.adapt else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    store.close()
    return 0
