"""Coverage-guided fuzzing of one parser target with atheris:

    python tests/chaos/fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR...]

TARGET is hello, control, ring or notes (shrimpio/_chaos/fuzz.py says what
each feeds).  libFuzzer writes new inputs into the first corpus directory:
start from a scratch copy of corpus/TARGET to keep the repository's seeds
small, e.g.

    cp -r tests/chaos/fuzz/corpus /tmp/corpus
    python tests/chaos/fuzz/run.py ring -max_total_time=60 /tmp/corpus/ring

``shrimpio chaos --fuzz-seconds N`` does this for every target.  A crash
leaves its input (``crash-*``); add it to corpus/TARGET so that the replay
in the default test run keeps it fixed.
"""

import runpy
import sys

from shrimpio._chaos import _atheris

if __name__ == "__main__":
    sys.argv[0] = _atheris.__file__
    runpy.run_path(_atheris.__file__, run_name="__main__")
