"""The package's one output path. Library modules only call ``logging.getLogger(__name__)``;
the entry points (the CLI, the rollout server's ``main``) call :func:`configure` once.

What goes where:
- INFO (start-up notes, the progress line, evaluation lines, warm-start progress) to stdout,
  as the bare message, so that each line reads as before;
- WARNING and above to stderr as ``LEVEL logger: message``.

Who speaks: global rank 0. Other ranks are silent, except for ERROR and above (a rank that
fails says why) and records logged with ``extra=EVERY_RANK`` (a rank-local event only that
rank sees, such as the restart of its own rollout server). ``SFPO_LOG_ALL_RANKS=1`` lets every
rank speak.
"""

from __future__ import annotations

import logging
import os
import sys

from sfpo_megatron.common.ranks import launcher_rank

ALL_RANKS_ENV = "SFPO_LOG_ALL_RANKS"
"""Set to 1 to see every rank's records, not only global rank 0's."""

EVERY_RANK = {"every_rank": True}
"""``extra=`` for a record every rank should show: an event local to the rank logging it."""

PACKAGE = "sfpo_megatron"


def global_rank() -> int:
    """This process's global rank: from torch.distributed once started, before that from the
    launcher's variables (torchrun's, else Slurm's), else 0."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group either
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    found = launcher_rank(os.environ)
    return 0 if found is None else found[1]


class RankFilter(logging.Filter):
    """Passes global rank 0's records, errors from every rank and records marked
    :data:`EVERY_RANK`; the rank is read at each record (it is known only once the launch
    variables are read or the process group started)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= logging.ERROR
            or getattr(record, "every_rank", False)
            or global_rank() == 0
        )


class _ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` or ``sys.stderr`` as they are when a record comes (a test's
    output capture replaces them), flushing each record."""

    def __init__(self, stream_name: str) -> None:
        logging.Handler.__init__(self)
        self._stream_name = stream_name

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._stream_name)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure(every_rank: bool = False) -> None:
    """Send the package's INFO records to stdout and everyone's warnings to stderr, from
    global rank 0 only unless ``every_rank`` or ``SFPO_LOG_ALL_RANKS=1``. Calling it again
    replaces what an earlier call installed."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    info = _ConsoleHandler("stdout")
    info.setFormatter(logging.Formatter("%(message)s"))
    info.addFilter(_Below(logging.WARNING))
    warning = _ConsoleHandler("stderr")
    warning.setLevel(logging.WARNING)
    warning.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for handler in (info, warning):
        if not (every_rank or os.environ.get(ALL_RANKS_ENV) == "1"):
            handler.addFilter(RankFilter())
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings only
    logging.getLogger(PACKAGE).setLevel(logging.INFO)
