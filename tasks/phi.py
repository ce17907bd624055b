"""Keep header values out of logs, consoles and reject messages.

pydicom's warnings and log lines quote raw header bytes (`Invalid value for VR
UI: '...'`), and on a damaged header those bytes can be a patient's name, id
or an institution. `install_filters` (called wherever a DICOM header can be
read: see tasks/dicom.py) turns pydicom's value validation off while reading,
the source of most such messages; keeps pydicom's own log records and warnings
off the console unless its logger is set to DEBUG (a file pydicom complains
about is rejected with one line of ours, or decodes, and its complaint adds
nothing), redacted even then; and redacts every other warning shown. `redact`
is also what reject details pass library messages through.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pydicom

REDACTED = "<redacted>"
# A quoted value ('...' or "...", as Python's repr and pydicom's messages quote them,
# bytes literals included), then a dotted run of numbers (a UID, a date or a decimal
# written out of context), then any long run of digits (an id).
_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*\"""", re.S)
_UID_LIKE = re.compile(r"\b\d+(?:\.\d+){2,}\b")
_LONG_NUMBER = re.compile(r"\b\d{6,}\b")
_PYDICOM_DIR = str(Path(pydicom.__file__).parent)


def redact(text: str) -> str:
    """`text` without quoted values, UID-like numbers and long digit runs."""
    text = _QUOTED.sub(REDACTED, str(text))
    text = _UID_LIKE.sub(REDACTED, text)
    return _LONG_NUMBER.sub(REDACTED, text)


def _debugging_pydicom() -> bool:
    return logging.getLogger("pydicom").isEnabledFor(logging.DEBUG)


class PydicomRecordFilter(logging.Filter):
    """On pydicom's loggers: drop their records unless pydicom is being debugged; then
    redact the message (arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _debugging_pydicom():
            return False
        record.msg, record.args = redact(record.getMessage()), ()
        return True


class CapturedWarningFilter(logging.Filter):
    """On "py.warnings", where warnings go once logging.captureWarnings(True) is on: the same
    rule as for shown warnings (the record's message starts with the warning's file name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_PYDICOM_DIR) and not _debugging_pydicom():
            return False
        record.msg, record.args = redact(message), ()
        return True


_FILTER, _CAPTURED_FILTER = PydicomRecordFilter(), CapturedWarningFilter()


def _redacting(show):
    """warnings.showwarning that drops pydicom's own warnings (unless debugging pydicom) and
    redacts every message it passes on to `show`."""
    def show_redacted(message, category, filename, lineno, file=None, line=None) -> None:
        if str(filename).startswith(_PYDICOM_DIR) and not _debugging_pydicom():
            return
        # The source line is left out: it could be code that holds the value.
        show(redact(str(message)), category, filename, lineno, file, line="")
    show_redacted.redacting = True
    return show_redacted


def pydicom_loggers() -> list[logging.Logger]:
    """pydicom's logger and the module loggers below it (a logger's filters apply only to the
    records made on it, not to those its children pass up)."""
    names = [name for name in logging.root.manager.loggerDict if name == "pydicom" or name.startswith("pydicom.")]
    return [logging.getLogger(name) for name in {"pydicom", *names}]


def install_filters() -> None:
    """Stop pydicom validating values as it reads, filter its log records and redact warnings
    (see the module's docstring). Safe to call again."""
    # Import the decoder modules first so that their loggers exist and get the filter.
    import pydicom.pixels  # noqa: F401

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    for logger in pydicom_loggers():
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not getattr(warnings.showwarning, "redacting", False):
        warnings.showwarning = _redacting(warnings.showwarning)
    captured = logging.getLogger("py.warnings")
    if _CAPTURED_FILTER not in captured.filters:
        captured.addFilter(_CAPTURED_FILTER)
