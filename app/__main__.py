"""``python -m app [--flags]``: serve /chat. Every flag has a KAITO_* env var twin."""

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from app.admission import Admission
from app.gpu_check import preflight
from app.logs import configure_logging
from app.server import create_app
from app.settings import load_settings

log = logging.getLogger("app")


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains: readiness and new requests turn 503 while
    in-flight requests finish (up to the grace period); then the usual shutdown stops the
    engine. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, admission: Admission, grace_seconds: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.grace_seconds = grace_seconds
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        log.info("SIGTERM: draining %d in-flight requests", self.admission.in_flight)
        finished = await self.admission.drain(self.grace_seconds)
        if not finished:
            log.warning("grace period over with %d requests in flight", self.admission.in_flight)
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, settings.log_format)
    # Before anything loads the model: an old driver gets one line that names it and the
    # floor, not an engine error minutes later (app/gpu_check.py).
    gpu_problems = preflight(settings.device)
    for problem in gpu_problems:
        log.error("KAITO_DEVICE=%s: %s", settings.device, problem)
    if gpu_problems:
        return 1
    fatal: list[str] = []
    server: DrainingServer | None = None

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        log_config=None,  # keep our handlers (JSON lines)
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.admission, settings.shutdown_grace_seconds)
    server.run()
    if fatal:
        log.error("exiting non-zero: %s", fatal[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
