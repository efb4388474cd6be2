"""Versioned JSON documents for profiles and plans."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dump_document", "load_document"]

VERSION = 1


def dump_document(kind: str, payload: dict[str, Any]) -> str:
    """Render ``payload`` as an indented JSON document tagged with ``kind`` and a version."""
    return json.dumps({"format": kind, "version": VERSION, **payload}, indent=2)


def load_document(text: str | bytes, kind: str) -> dict[str, Any]:
    """Parse a document written by :func:`dump_document`; ``ValueError`` if it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a {kind} document: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != kind:
        raise ValueError(f'not a {kind} document: missing "format": "{kind}"')
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported {kind} version {data.get('version')!r}; expected {VERSION}")
    return data
