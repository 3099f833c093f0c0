"""The package as a new user meets it: what ``import shrimpio`` costs and
names, and what it says when run from a source tree that is not built."""

from __future__ import annotations

import pydoc
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import shrimpio
from children import child_env

PACKAGE = Path(shrimpio.__file__).resolve().parent


def test_import_does_not_load_asyncio():
    """The asyncio names are there, but asyncio and uvloop are imported only
    when they are used (they would double the import's time)."""
    code = ("import sys, shrimpio\n"
            "assert 'asyncio' not in sys.modules and 'uvloop' not in sys.modules, 'eager'\n"
            "assert shrimpio.EventLoopPolicy.__name__ == 'EventLoopPolicy'\n"
            "import asyncio\n"
            "assert issubclass(shrimpio.EventLoopPolicy, asyncio.AbstractEventLoopPolicy)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(), timeout=60)


def test_public_names_are_real_and_documented():
    text = pydoc.render_doc(shrimpio, renderer=pydoc.plaintext)
    for name in shrimpio.__all__:
        assert getattr(shrimpio, name) is not None, name
        if name != "__version__":
            assert name in text, f"help(shrimpio) does not show {name}"
    for name in ("run", "new_event_loop", "install"):
        fn = getattr(shrimpio, name)
        assert fn.__module__ == "shrimpio" and fn.__doc__, name


def test_source_tree_without_build_says_what_to_do(tmp_path):
    """``import shrimpio`` from a clone that was never built: an error that
    says how to build or where to run from, not just a missing module."""
    tree = tmp_path / "clone"
    shutil.copytree(PACKAGE, tree / "shrimpio",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.c"))
    (tree / "setup.py").write_text("# the project's build script\n")
    # (The current directory comes first on sys.path: the clone shadows
    # the installed package, as it does for a user in the clone.  -S: no
    # site-packages, whose editable-install finder would supply the built
    # extension of this checkout.)
    res = subprocess.run([sys.executable, "-S", "-c", "import shrimpio"], cwd=tree, capture_output=True,
                         env=child_env(), timeout=60)
    err = res.stderr.decode()
    assert res.returncode != 0, err
    assert "source tree" in err and "pip install -e ." in err and "another directory" in err, err


def test_bench_children_import_the_installed_package_from_a_source_tree(tmp_path):
    """The bench starts children with ``-m``/``-c`` (mpiexec's, the TLS
    row's), and the README runs it from the clone: their interpreter
    (``child_python``) must not put the current directory, a source tree
    that shadows the installed package, first on sys.path."""
    from shrimpio.bench.common import child_python
    tree = tmp_path / "clone"
    (tree / "shrimpio").mkdir(parents=True)
    (tree / "shrimpio" / "__init__.py").write_text("raise ImportError('the source tree was imported')\n")
    code = "import shrimpio; print(shrimpio.__file__)"
    res = subprocess.run([*child_python(), "-c", code], cwd=tree, capture_output=True, text=True,
                         env=child_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    assert not res.stdout.strip().startswith(str(tree)), res.stdout
    # (without -P the tree is what a child gets)
    res = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         env=child_env(), timeout=60)
    assert "the source tree was imported" in res.stderr
