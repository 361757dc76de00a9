"""Fast digests of file content, for caches that must notice any changed byte.

Why xxh3-128 and not SHA-256 or BLAKE2: the token store is verified on every
open and a corpus is hashed whole when its store is built, so the hash runs
at memory speed, several times faster than the cryptographic ones. It guards
against accidents (a truncated copy, an edited or overwritten file), not
against someone forging a collision.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

BLOCK = 1 << 22  # bytes per read: large enough that the hash, not the call, dominates


def file_digest(path: Path) -> str:
    """Hex xxh3-128 of the whole file; raises ``OSError`` like ``open``."""
    hasher = xxhash.xxh3_128()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def text_digest(*parts: str) -> str:
    """Hex xxh3-128 of strings joined unambiguously (each one's length goes first)."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()
