"""hgm_mm reports through `logging`, under the "hgm_mm" logger; `log_to_console` shows its messages as plain lines.

The library never prints a run's progress: a notebook or a service chooses what it sees. The
command line calls `log_to_console` (`--log-level`, `--quiet`); in a notebook

    import hgm_mm
    hgm_mm.log_to_console()          # a training run's lines, as `hgm-mm train` shows them

Progress bars (tqdm) are separate: each long call takes `progress=False`.
"""
from __future__ import annotations

import logging
import sys

LOGGER_NAME = "hgm_mm"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _ConsoleHandler(logging.StreamHandler):
    """Plain lines on standard error, looked up when each line is written, so that a notebook's or a
    test's replacement stream receives it. Standard output stays for what a command answers (the
    JSON of `hgm-mm match --json`, the table of `hgm-mm evaluate`)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def log_to_console(level: int | str = "INFO") -> None:
    """Shows hgm_mm's messages of `level` and above as plain lines on standard error. Calling it
    again replaces the earlier setting.

    Args:
        level: a `logging` level or its name ("DEBUG", "INFO", "WARNING", "ERROR").
    """
    if isinstance(level, str):
        if level.upper() not in LEVELS:
            raise ValueError(f"log level {level!r}; expected one of {list(LEVELS)}")
        level = getattr(logging, level.upper())
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_ConsoleHandler())
    logger.setLevel(level)
