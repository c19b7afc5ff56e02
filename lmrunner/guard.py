"""One LM's failure is never the daemon's.

Each piece of work the factory does for one LM (its end, enforcement, a start, an orphan's
removal, a reload) runs inside :func:`guarded`: an error is logged with the LM's name and the
work is left for a later pass or reconcile to retry. Store errors pass through: a state
directory that cannot be written concerns every LM and is the loop's business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from lmrunner.errors import LmrunnerError
from lmrunner.state import StoreError

LOG = logging.getLogger("lmrunner.factory")


@contextmanager
def guarded(name: str) -> Iterator[None]:
    try:
        yield
    except StoreError:
        raise
    except LmrunnerError as err:
        LOG.error("lm=%s: %s (retried later)", name, err)
    except Exception:  # a bug or an engine's surprise: one LM's, never the factory's
        LOG.exception("lm=%s: unexpected error (retried later)", name)
