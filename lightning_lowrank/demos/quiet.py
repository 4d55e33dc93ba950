"""Silence two start-up messages of the demo's stack that say nothing about the run.

- torch 2.13 deprecates instantiating ``torch.utils._pytree.LeafSpec``, and Lightning's
  ``lightning.pytorch.utilities._pytree`` still does so on every batch it flattens: a
  ``FutureWarning`` that the user can do nothing about;
- Lightning's logger connector logs an advert for the ``litlogger`` package (on the
  ``lightning.pytorch.utilities.rank_zero`` logger) whenever a run has no ``LitLogger``.

Only these two are filtered, by their exact text; every other warning and log record still shows.
"""

from __future__ import annotations

import logging
import warnings

_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and "litlogger" in message)


_FILTER = _DropLitLoggerTip()


def quiet_lightning() -> None:
    """Install both filters (idempotent)."""
    warnings.filterwarnings("ignore", message=_LEAFSPEC, category=FutureWarning)
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
