"""Semantic conformance: shrimpio sockets behave exactly like stdlib sockets.

The tests live once in ``tests/conformance/suite.py``; every one of them runs
here for each ``kind`` of connection:

* ``stdlib``: plain ``socket.socket`` (``shrimpio.patch`` disabled): the
  reference behaviour;
* ``shm``: ``shrimpio.socket.socket`` at both ends, over shared memory;
* ``tcp_fallback``: shrimpio sockets whose connections fall back to kernel
  TCP (a ``shrimpio._route.add_tcp_rule`` per listening port).

For the shrimpio kinds ``shrimpio.patch`` is enabled during the test, so the
module-level entry points (``socket.socket``, ``create_connection``,
``create_server``, ``fromfd``, ``select.*``, ``selectors.*``) are shrimpio's,
as in a patched program.
"""

from __future__ import annotations

import socket

import pytest

import shrimpio.patch
from shrimpio import _route

from conformance import suite, suite_details
from conformance.harness import KINDS, Net

# Importing shrimpio.patch enables it; the tests here switch it per kind and
# the rest of the test session must see the stdlib.
shrimpio.patch.disable()


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def patched(kind):
    """The patch on for the shrimpio kinds, off for stdlib; always off after."""
    if kind == "stdlib":
        shrimpio.patch.disable()
    else:
        shrimpio.patch.enable()
    try:
        yield shrimpio.patch.enabled()
    finally:
        shrimpio.patch.disable()


@pytest.fixture
def net(kind, patched, registry):
    """Connection factory of the kind; closes what it made, forgets TCP rules."""
    n = Net(kind)
    try:
        yield n
    finally:
        try:
            n.close()
        finally:
            _route.clear_tcp_rules()
            socket.setdefaulttimeout(None)


class TestConnect(suite.ConnectTests):
    pass


class TestAddresses(suite.AddressTests):
    pass


class TestData(suite.DataTests):
    pass


class TestFiles(suite.FileTests):
    pass


class TestShutdownClose(suite.ShutdownCloseTests):
    pass


class TestDescriptors(suite.DescriptorTests):
    pass


class TestTimeouts(suite.TimeoutTests):
    pass


class TestSockopts(suite.SockoptTests):
    pass


class TestFactories(suite.FactoryTests):
    pass


class TestPollers(suite.PollerTests):
    pass


class TestPollerApi(suite.PollerApiTests):
    pass


class TestThreads(suite.ThreadTests):
    pass


class TestProcesses(suite.ProcessTests):
    pass


class TestArgumentErrors(suite.ArgumentErrorTests):
    pass


class TestSendmsg(suite_details.SendmsgTests):
    pass


class TestOptionTypes(suite_details.OptionTypeTests):
    pass


class TestListenerMode(suite_details.ListenerModeTests):
    pass


class TestPeerClosed(suite_details.PeerClosedTests):
    pass
