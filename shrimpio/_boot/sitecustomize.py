"""Patches Python processes started under ``shrimpio run`` or by a patched
program (``subprocess``, ``multiprocessing`` spawn/forkserver).

``shrimpio.patch`` puts this directory on ``PYTHONPATH`` and sets
``SHRIMPIO_PATCH=1``; Python imports ``sitecustomize`` at start-up, so the
child patches itself before the program's first import.  Any other
``sitecustomize`` further along ``sys.path`` still runs afterwards.
"""

import importlib
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("SHRIMPIO_PATCH") == "1":
    try:
        import shrimpio.patch  # noqa: F401  (patches on import)
    except ImportError as exc:       # shrimpio not importable in this interpreter
        sys.stderr.write(f"shrimpio: not patching this process: {exc}\n")

# Chain to the next sitecustomize, if any.
_saved_path = sys.path[:]
_me = sys.modules.pop("sitecustomize", None)
try:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
finally:
    sys.path[:] = _saved_path
    if _me is not None:
        sys.modules["sitecustomize"] = _me
