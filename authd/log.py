"""Logging: structlog to journald's native protocol under systemd, JSON lines when piped, a console on a tty.

Events have constant text and carry variables as fields (``log.info("peer attested", peer=..., ttl_s=...)``).
Context such as the job name is bound with :func:`structlog.contextvars.bind_contextvars` and follows the
asyncio task. Standard-library loggers (grpc, aiohttp) are rendered the same way.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from authd.journal import JournalWriter, journal_record, stderr_is_journal
from authd.logbook import Logbook

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

Format = Literal["auto", "json", "console"]


def configure(level: str, fmt: Format = "auto", *, logbook: Logbook | None = None) -> None:
    """Set up structlog and stdlib logging; safe to call again (SIGHUP changes the level).

    ``auto`` sends to journald (each record with its priority and fields) when stderr is the journal, JSON
    lines to stdout when it is not a terminal, and a readable console otherwise. ``logbook`` also keeps the
    last warnings and errors, of authd and of the libraries, for ``authd status``.
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if logbook is not None:
        shared.append(logbook)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    if fmt == "auto" and stderr_is_journal():
        journal = JournalWriter()
        chain: list[structlog.types.Processor] = [*shared, structlog.processors.format_exc_info]
        structlog.configure(
            processors=[*chain, journal_record],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
            logger_factory=lambda *_args: journal,
            cache_logger_on_first_use=False,
        )
        root.handlers[:] = [_JournalHandler(journal, chain)]
        root.setLevel(max(LEVELS[level], logging.WARNING))
        return
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
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
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.WARNING))


class _JournalHandler(logging.Handler):
    """Standard-library records (grpc, aiohttp) through the same processors, to the same journal socket."""

    def __init__(self, journal: JournalWriter, chain: list[structlog.types.Processor]) -> None:
        super().__init__()
        self._journal = journal
        self._chain = chain

    def emit(self, record: logging.LogRecord) -> None:
        event: structlog.types.EventDict = {"event": record.getMessage(), "logger": record.name}
        if record.exc_info:
            event["exc_info"] = record.exc_info
        method = record.levelname.lower()
        for processor in self._chain:
            result = processor(None, method, event)
            assert isinstance(result, dict)  # every link of the chain returns the event dict
            event = result
        self._journal.send(event)

    def close(self) -> None:
        self._journal.close()
        super().close()
