"""Stable digests of JSON-able values: the identities of banks, feature-store entries and packages.

A low utility with no anomret imports, so every layer can name what it stores by the same rule.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
