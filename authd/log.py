"""Logging: structlog with JSON lines for journald, a readable console on a terminal.

Events have constant text and carry variables as fields (``log.info("peer attested", peer=..., ttl_s=...)``).
Context such as the job name is bound with :func:`structlog.contextvars.bind_contextvars` and follows the
asyncio task. Standard-library loggers (grpc, aiohttp) are rendered the same way.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from authd.logbook import Logbook

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

Format = Literal["auto", "json", "console"]


def configure(level: str, fmt: Format = "auto", *, logbook: Logbook | None = None) -> None:
    """Set up structlog and stdlib logging; safe to call again (SIGHUP changes the level).

    ``logbook`` also keeps the last warnings and errors, of authd and of the libraries, for ``authd status``.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if logbook is not None:
        shared.append(logbook)
    renderer: structlog.types.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.WARNING))
