"""rannc's console log: `<name>: message` lines on rank 0 that print above any active tqdm progress bar.

A plain `StreamHandler(sys.stderr)` writes into the middle of a bar's line (the bar is redrawn with `\\r`
and no newline), so a log line emitted during, say, the training loop's first step (rannc's tracing,
profiling and planning) ends up glued to the bar. `tqdm.tqdm.write` clears the active bars, prints the
line and redraws them below it.
"""

from __future__ import annotations

import logging
import sys

import tqdm

LOGGER_NAME = "rannc"
FORMAT = "<%(name)s>: %(message)s"


class TqdmLoggingHandler(logging.Handler):
    """Writes each record through `tqdm.tqdm.write` to the current `sys.stderr` (looked up at emit time, so
    a later redirection of stderr, e.g. by pytest, is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            tqdm.tqdm.write(message, file=sys.stderr)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool, rank: int) -> None:
    """Show rannc's INFO messages on rank 0 when `verbose`. Installs its handler once: nothing happens when
    the "rannc" logger already has a handler (ours from an earlier call, or one the user configured)."""
    if not verbose or rank != 0:
        return
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers:
        return
    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    # INFO, unless the user already asked for more detail (DEBUG).
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
