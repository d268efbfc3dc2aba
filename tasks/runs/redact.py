"""Credentials never reach a report, a summary or an artifact: they are masked on the way out.

Settings are the only user text that runs copy into reports, and the places a secret hides in
them are URL passwords (`s3://key:secret@bucket/...`), secret-looking query parameters (tokens,
signatures) and secret-looking keys in nested options.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_NAME = re.compile(
    r"pass(word)?|secret|token|signature|credential|api[_-]?key|auth", re.IGNORECASE
)


def redact(value: Any) -> Any:
    """A copy of `value` (JSON-like: dicts, lists, strings...) with every credential masked."""
    if isinstance(value, dict):
        return {
            key: MASK if SECRET_NAME.search(str(key)) and item else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def redact_url(url: str) -> str:
    """The URL with its password and secret-looking query values masked; others unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL after all (e.g. an odd port): nothing we can parse to mask
        return url
    netloc = parts.netloc
    if password:
        user_info, _, host = netloc.rpartition("@")
        netloc = f"{user_info.split(':', 1)[0]}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_NAME.search(name) for name, _ in pairs):
            query = urlencode(
                [(name, MASK if SECRET_NAME.search(name) else item) for name, item in pairs],
                safe="*",
            )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
