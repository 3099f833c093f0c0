"""Content shared by the app-matrix programs and tests: deterministic bytes
(a reordered, lost or repeated chunk changes the digest)."""

import hashlib
import random


def blob(n: int) -> bytes:
    """``n`` pseudo-random bytes, the same for every caller."""
    return random.Random(n).randbytes(n)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
