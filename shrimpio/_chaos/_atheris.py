"""``python shrimpio/_chaos/_atheris.py TARGET [libFuzzer options] [CORPUS...]``:
one fuzz target under atheris, shrimpio's Python code instrumented for
coverage (what ``shrimpio chaos --fuzz-seconds`` and
tests/chaos/fuzz/run.py run)."""

import sys

import atheris

with atheris.instrument_imports(include=["shrimpio"]):
    # Every module a target reaches, imported here so that it is instrumented.
    import shrimpio._accept  # noqa: F401
    import shrimpio._control  # noqa: F401
    import shrimpio.vmmc  # noqa: F401
    from shrimpio._chaos import fuzz, hello  # noqa: F401


def main() -> None:
    target = fuzz.TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
