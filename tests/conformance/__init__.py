"""Semantic conformance suite for shrimpio sockets.

The test bodies (``suite.py``) are written once, against the stdlib socket
API, and run by ``tests/test_conformance.py`` over three kinds of connection:
plain stdlib sockets, shrimpio sockets over shared memory, and shrimpio
sockets that fell back to kernel TCP.  Every assertion must hold for all
three: shrimpio behaves exactly like the real thing.
"""
