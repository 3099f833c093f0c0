"""``python -m shrimpio.bench``: the same as ``shrimpio bench``."""

import argparse
import sys

from .runner import add_arguments, main

ap = argparse.ArgumentParser(prog="python -m shrimpio.bench", description="the whole benchmark matrix, with peers and goals")
add_arguments(ap)
sys.exit(main(ap.parse_args()))
