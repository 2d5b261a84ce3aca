"""`perfxllm serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import os
from types import FrameType

from perfxllm.errors import PerfxError

SHUTDOWN_GRACE_S = 5


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from perfxllm.server.app import ServerConfig, create_app
        from perfxllm.server.async_engine import AsyncEngine
    except ImportError as e:
        raise PerfxError(
            f"perfxllm serve needs the server extra ({e}): pip install 'perfxllm[server]'"
        ) from None
    from perfxllm.cli import engine_options
    from perfxllm.engine.config import EngineConfig

    if args.max_queue < 1 or args.max_body_mb <= 0:
        raise PerfxError("--max-queue and --max-body-mb must be positive")
    engine = AsyncEngine.spawn(EngineConfig(model=args.model, **engine_options(args)), args.max_queue)
    config = ServerConfig(
        api_key=args.api_key or os.environ.get("PERFXLLM_API_KEY") or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    app = create_app(engine, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn waits for open connections to finish: end the requests in flight now, so that streams
            # close at once with an error event and non-streaming requests get a 503.
            app.state.async_engine.stop()
            super().handle_exit(sig, frame)

    # Idle connections are kept longer than clients keep theirs (httpx, and so the openai client: 5 s, as
    # uvicorn's default): a client then never sends a request on a connection the server is closing. At
    # shutdown, a connection still open after SHUTDOWN_GRACE_S (a client that stopped sending its body) is
    # closed, instead of holding the server up for as long as it stays.
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    Server(uvicorn_config).run()
    return 0
