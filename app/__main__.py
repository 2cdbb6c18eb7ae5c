"""``python -m app [--flags]``: serve /chat. Every flag has a KAITO_* env var twin."""

import logging
import sys

import uvicorn

from app.server import create_app
from app.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )
    server = uvicorn.Server(config)
    server.run()
    if fatal:
        logging.getLogger("app").error("exiting: %s", fatal[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
