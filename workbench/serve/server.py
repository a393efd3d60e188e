"""uvicorn around the app: in the foreground for the CLI, in a background thread for tests and bench."""

from __future__ import annotations

import threading
import time

import uvicorn

from workbench.errors import WorkbenchError
from workbench.serve.engine import Engine


def serve_forever(app, engine: Engine, host: str, port: int, log_level: str = "info") -> None:
    """Run until Ctrl-C; the engine thread runs for as long as the server does."""
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()


class BackgroundServer:
    """`with BackgroundServer(app, engine) as server:` serves on 127.0.0.1, a free port, at `server.url`.

    The engine is started with the server unless `start_engine=False` (a test can then fill the
    queue before anything is answered, and call `engine.start()` itself).
    """

    def __init__(self, app, engine: Engine, host: str = "127.0.0.1", port: int = 0, start_engine: bool = True):
        self.engine, self.start_engine = engine, start_engine
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="workbench-serve-http", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        if self.start_engine:
            self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise WorkbenchError("the HTTP server did not start (see the log above)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()
