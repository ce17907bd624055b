"""Why a file cannot be used: the error decoding raises, shared by every stage that decodes."""

from __future__ import annotations

from pathlib import Path


class UnreadableImage(Exception):
    """A file that cannot be turned into an image; the message says why.

    `reason` is the message; `path` is the file, when known.
    """

    def __init__(self, reason: str, path: Path | None = None):
        super().__init__(reason)
        self.reason = reason
        self.path = path
