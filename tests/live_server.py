"""A real uvicorn server for an app, on a free loopback port, in a background thread, with the
event loop and HTTP parser `python -m serve` runs."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from serve.app import UVICORN_OPTIONS


class LiveServer:
    def __init__(self, app, startup_timeout: float = 60.0):
        self.app = app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves this socket
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **UVICORN_OPTIONS))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
