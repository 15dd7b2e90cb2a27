"""Errors of remote paths (gs://, s3://) as one line: shared by the presets and the RLDS reader.

Its own module so that `presets` (which builds on `rlds`) and `rlds` both import it, and neither
imports the other back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import SourceError


@contextmanager
def remote_errors(where: str) -> Iterator[None]:
    """One clear line instead of a traceback when a remote path (gs://, s3://) cannot be reached."""
    try:
        yield
    except ImportError as exc:
        raise SourceError(f"{where}: {exc} (for gs:// paths: pip install gcsfs)") from None
    except OSError as exc:
        if "://" not in where:
            raise
        raise SourceError(f"{where}: cannot be read: {type(exc).__name__}: {exc}") from None
