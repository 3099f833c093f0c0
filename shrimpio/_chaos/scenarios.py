"""The chaos scenarios.  Each is a function ``(round, rng, **params)``
that starts processes, drives them, and leaves the judging to the round
(harness.py).  ``SCENARIOS`` maps a name to (function, parameter space):
a round picks a value of each parameter at random, or takes the ones
given (the fast subset in the default test run pins them).
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any, Callable

from .hello import HOSTILE_HOST
from .harness import Round, RoundFailed, entry_of

STREAM_APIS = ["blocking", "nonblocking", "selectors", "asyncio"]
APIS = STREAM_APIS + ["vmmc"]


def _key(rng: random.Random) -> str:
    return "%016x" % rng.getrandbits(64)


def _stats_fail(rnd: Round, proc, stats: dict, what: str) -> None:
    """An honest process's connections must all have completed."""
    bad = {k: v for k, v in stats.items() if k.startswith(("cut", "refused")) and v}
    if bad:
        rnd.fail("data", proc, f"{what}: connections lost in an honest exchange: {bad}")


# -- SIGKILL of either side -------------------------------------------------------------

def kill(rnd: Round, rng: random.Random, api: str, doomed: str) -> None:
    """The ``doomed`` side ("client" or "server") is SIGKILLed at a random
    moment of back-to-back connections (connect, accept, hello, transfer,
    close); the other side, using ``api``, must see it as TCP would and
    then sit idle without spinning."""
    key = _key(rng)
    other = rng.choice(STREAM_APIS)
    small = {"sizes": [0, 1, 100, 3000, 70000, 300000], "concurrency": rng.choice([1, 2, 8])}
    if doomed == "client":
        victim = rnd.spawn("victim", "server", {"api": api, "key": key}, "victim")
        addr = rnd.start(victim)["addr"]
        peer = rnd.spawn("doomed", "client", {"api": other, "key": key, "addr": addr, **small},
                         "doomed")
        rnd.start(peer)
    else:
        peer = rnd.spawn("doomed", "server", {"api": other, "key": key}, "doomed")
        addr = rnd.start(peer)["addr"]
        rnd.killed_entries.add(entry_of(addr))
        victim = rnd.spawn("victim", "client", {"api": api, "key": key, "addr": addr,
                                                 "stop_on_cut": True, **small}, "victim")
        rnd.start(victim)
    time.sleep(rng.choice([0.0, 0.001, 0.01, 0.05]) + rng.random() * 0.6)
    peer.kill(signal.SIGKILL)
    peer.reap(10)
    if doomed == "server":
        victim.expect("finished")      # its connections are over
    else:
        rnd.settle(victim)             # every connection from the dead client ended
    rnd.check_spin(victim, f"after its {doomed} peer was killed")
    victim.send("finish")
    rnd.notes["stats"] = rnd.quiesce(victim)
    rnd.notes["api"] = f"{api} vs {other}"


# -- ring headers scribbled by the peer -------------------------------------------------------

def scribble(rnd: Round, rng: random.Random, api: str, hostile: str) -> None:
    """A hostile peer (client or server) scribbles over the ring headers
    of its connections to the victim while they carry data; an honest peer
    talks to the victim at the same time and must lose nothing."""
    key = _key(rng)
    hargs = {"api": "blocking", "key": key, "scribble": True, "verify": False,
             "scribble_rate": rng.choice([50, 500, 5000])}
    if hostile == "client":
        victim = rnd.spawn("victim", "server", {"api": api, "key": key}, "victim")
        addr = rnd.start(victim)["addr"]
        bad = rnd.spawn("hostile", "client", {**hargs, "addr": addr, "bind": HOSTILE_HOST},
                        "hostile")
        good = rnd.spawn("honest", "client", {"api": rng.choice(STREAM_APIS), "key": key,
                                               "addr": addr, "conns": rng.randint(3, 12)}, "honest")
    else:
        bad = rnd.spawn("hostile", "server", hargs, "hostile")
        haddr = rnd.start(bad)["addr"]
        rnd.killed_entries.add(entry_of(haddr))
        good = rnd.spawn("honest", "server", {"api": rng.choice(STREAM_APIS), "key": key}, "honest")
        addr = rnd.start(good)["addr"]
        victim = rnd.spawn("victim", "client", {"api": api, "key": key, "addr": addr,
                                                 "hostile_addr": haddr, "conns": rng.randint(4, 16)},
                           "victim")
        rnd.start(victim)
    if hostile == "client":
        rnd.start(good)
        stats = good.expect("finished", 60)["stats"]
        _stats_fail(rnd, good, stats, "honest client")
        bad.send("finish")
        rnd.notes["hostile"] = bad.expect("finished", 1, soft=True).get("stats")
        bad.kill()
    elif not victim.expect("finished", 3, soft=True):
        # Its streams to the hostile server may stall (a live peer that
        # says nothing: TCP would wait too): once that peer is killed,
        # they must end.
        bad.kill()
        victim.expect("finished")
    bad.kill()
    bad.reap(10)
    if hostile == "client":
        rnd.settle(victim)             # (a client victim has "finished": no connection left)
    rnd.check_spin(victim, "after its hostile peer was killed")
    victim.send("finish")
    good.send("finish")
    vstats = rnd.quiesce(victim)
    gstats = rnd.quiesce(good)
    if hostile == "server":
        _stats_fail(rnd, good, gstats, "honest server")
    rnd.notes["stats"] = vstats


# -- hostile hellos and fds -----------------------------------------------------------------------

def hellos(rnd: Round, rng: random.Random, api: str) -> None:
    """Hostile hellos and fds at the victim listener while an honest
    client connects: every honest stream arrives whole."""
    key = _key(rng)
    victim = rnd.spawn("victim", "server", {"api": api, "key": key}, "victim")
    addr = rnd.start(victim)["addr"]
    bad = rnd.spawn("hostile", "hostile_hellos", {"addr": addr}, "hostile")
    rnd.start(bad)
    good = rnd.spawn("honest", "client", {"api": rng.choice(STREAM_APIS), "key": key,
                                           "addr": addr, "conns": rng.randint(5, 20),
                                           "sizes": [0, 1, 100, 5000, 70000]}, "honest")
    rnd.start(good)
    stats = good.expect("finished", 60)["stats"]
    _stats_fail(rnd, good, stats, "honest client")
    time.sleep(rng.random() * 0.3)
    bad.send("finish")
    rnd.notes["hellos"] = bad.expect("finished", 30)["stats"]
    bad.reap(10)
    good.send("finish")
    rnd.quiesce(good)
    victim.send("finish")
    rnd.notes["stats"] = rnd.quiesce(victim)


def honest(rnd: Round, rng: random.Random, api: str, client_api: str) -> None:
    """No hostile party, no death: every stream arrives whole (the
    baseline the other scenarios are measured against)."""
    key = _key(rng)
    victim = rnd.spawn("victim", "server", {"api": api, "key": key}, "victim")
    addr = rnd.start(victim)["addr"]
    good = rnd.spawn("honest", "client", {"api": client_api, "key": key, "addr": addr,
                                           "conns": rng.randint(5, 30),
                                           "concurrency": rng.choice([1, 4, 16])}, "honest")
    rnd.start(good)
    _stats_fail(rnd, good, good.expect("finished", 60)["stats"], "honest client")
    good.send("finish")
    rnd.quiesce(good)
    victim.send("finish")
    rnd.notes["stats"] = rnd.quiesce(victim)


# -- VMMC ------------------------------------------------------------------------------------

def _vmmc_exporter(rnd: Round, key: str, kind: str = "victim"):
    exp = rnd.spawn("exporter", "vmmc_exporter", {"name": "exp", "key": key}, kind)
    rnd.start(exp)
    return exp


def vmmc(rnd: Round, rng: random.Random, case: str) -> None:
    """The VMMC Endpoint: an importer SIGKILLed at a random moment (of its
    import or its sends), the exporter SIGKILLed likewise, a hostile
    importer (garbage notification records, its notification ring's
    header scribbled), or a fake endpoint answering imports with hostile
    replies and fds."""
    key = _key(rng)
    if case == "kill_exporter":
        exp = _vmmc_exporter(rnd, key, "doomed")
        rnd.killed_entries.add("exp")
        victim = rnd.spawn("victim", "vmmc_importer", {"name": "imp", "exporter": "exp", "key": key},
                           "victim")
        rnd.start(victim)
        time.sleep(rng.random() * 0.5)
        exp.kill()
        exp.reap(10)
        rnd.notes["stats"] = victim.expect("finished")["stats"]
        rnd.check_spin(victim, "after its exporter was killed")
        victim.send("finish")
        rnd.quiesce(victim)
        return
    if case == "fake_endpoint":
        fake = rnd.spawn("fake", "vmmc_fake", {"name": "exp"}, "hostile")
        rnd.start(fake)
        victim = rnd.spawn("victim", "vmmc_asker", {"name": "imp", "exporter": "exp",
                                                     "imports": rng.randint(10, 60)}, "victim")
        rnd.start(victim)
        rnd.notes["stats"] = victim.expect("finished")["stats"]
        fake.send("finish")
        rnd.notes["fake"] = fake.expect("finished", 10, soft=True).get("stats")
        victim.send("finish")
        rnd.quiesce(victim)
        return
    exp = _vmmc_exporter(rnd, key)
    good = rnd.spawn("honest", "vmmc_importer", {"name": "good", "exporter": "exp", "key": key},
                     "honest")
    rnd.start(good)
    other = rnd.spawn("other", "vmmc_importer",
                      {"name": "bad", "exporter": "exp", "key": key, "buffer": "open",
                       "scribble": case == "hostile"},
                      "hostile" if case == "hostile" else "doomed")
    rnd.start(other)
    time.sleep(rng.random() * 0.8)
    other.kill()
    other.reap(10)
    rnd.killed_entries.add("bad")
    time.sleep(rng.random() * 0.2)
    good.send("finish")
    gstats = good.expect("finished")["stats"]
    if gstats.get("cut") or gstats.get("refused"):
        rnd.fail("data", good, f"honest importer lost its link: {gstats}")
    rnd.quiesce(good)
    rnd.settle(exp)                    # both importers' links dropped
    rnd.check_spin(exp, f"after its {case} importer was killed")
    exp.send(f"honest {gstats.get('sent', 0)}")
    exp.send("finish")
    rnd.notes["stats"] = exp.expect("finished")["stats"]
    rnd.notes["sent"] = gstats
    if rnd.notes["stats"]["honest"] != gstats.get("sent"):
        rnd.fail("data", exp, f"{gstats.get('sent')} honest records sent, "
                 f"{rnd.notes['stats']['honest']} arrived")
    rnd.quiesce(exp)


# -- fds handed over, fds run out -------------------------------------------------------------

def handoff(rnd: Round, rng: random.Random, how: str) -> None:
    """A shared-memory connection part-way through a stream is handed to
    another process, which finishes it: both sides check every byte."""
    key = _key(rng)
    srv = rnd.spawn("server", "server", {"api": rng.choice(STREAM_APIS), "key": key}, "honest")
    addr = rnd.start(srv)["addr"]
    victim = rnd.spawn("victim", "handoff", {"addr": addr, "key": key, "how": how,
                                              "rounds": rng.randint(1, 3)}, "victim")
    rnd.start(victim)
    rnd.notes["stats"] = victim.expect("finished", 120)["stats"]
    victim.send("finish")
    rnd.quiesce(victim)
    srv.send("finish")
    sstats = rnd.quiesce(srv)
    _stats_fail(rnd, srv, sstats, "echo server")


def exhaust(rnd: Round, rng: random.Random, side: str, api: str, tight: bool = False) -> None:
    """The victim's RLIMIT_NOFILE is a few fds above what it holds (``tight``:
    the fewest, see fdplay.MIN_SERVER_HEADROOM); it makes (client) or takes
    (server) many connections at once."""
    from .fdplay import MIN_CLIENT_HEADROOM, MIN_SERVER_HEADROOM
    key = _key(rng)
    if side == "client":
        srv = rnd.spawn("server", "server", {"api": api, "key": key}, "honest")
        addr = rnd.start(srv)["addr"]
        extra = {"headroom": [MIN_CLIENT_HEADROOM] * 2} if tight else {}
        victim = rnd.spawn("victim", "exhaust", {"addr": addr, "key": key, **extra,
                                                  "conns": rng.choice([20, 60, 200])}, "victim")
        rnd.start(victim)
        rnd.notes["stats"] = victim.expect("finished", 120)["stats"]
        victim.send("finish")
        rnd.quiesce(victim)
        srv.send("finish")
        _stats_fail(rnd, srv, rnd.quiesce(srv), "echo server")
        return
    extra = {"headroom": [MIN_SERVER_HEADROOM] * 2} if tight else {}
    victim = rnd.spawn("victim", "exhaust_server", {"api": api, "key": key, **extra}, "victim")
    addr = rnd.start(victim)["addr"]
    good = rnd.spawn("honest", "client", {"api": rng.choice(STREAM_APIS), "key": key,
                                           "addr": addr, "conns": rng.choice([20, 60]),
                                           "concurrency": rng.choice([16, 48]),
                                           "sizes": [0, 10, 5000, 70000]}, "honest")
    rnd.start(good)
    _stats_fail(rnd, good, good.expect("finished", 120)["stats"], "client")
    good.send("finish")
    rnd.quiesce(good)
    victim.send("finish")
    rnd.notes["stats"] = rnd.quiesce(victim)


SCENARIOS: dict[str, tuple[Callable[..., None], dict[str, list[Any]]]] = {
    "kill": (kill, {"api": STREAM_APIS, "doomed": ["client", "server"]}),
    "scribble": (scribble, {"api": STREAM_APIS, "hostile": ["client", "server"]}),
    "hellos": (hellos, {"api": STREAM_APIS}),
    "vmmc": (vmmc, {"case": ["kill_importer", "kill_exporter", "hostile", "fake_endpoint"]}),
    "handoff": (handoff, {"how": ["send_fds", "pass_fds", "spawn"]}),
    "exhaust": (exhaust, {"side": ["client", "server"], "api": STREAM_APIS,
                          "tight": [False, False, True]}),
    "honest": (honest, {"api": STREAM_APIS, "client_api": STREAM_APIS}),
}


def register(name: str, fn: Callable[..., None], space: dict[str, list[Any]]) -> None:
    SCENARIOS[name] = (fn, space)


def run_round(name: str, seed: int, params: "dict | None" = None, keep: bool = False) -> Round:
    """Run one round of scenario ``name``; the round (findings, notes)."""
    fn, space = SCENARIOS[name]
    rng = random.Random(f"{name}:{seed}")
    chosen = {k: rng.choice(v) for k, v in space.items()}
    chosen.update(params or {})
    rnd = Round(name, seed)
    rnd.notes["params"] = chosen
    try:
        try:
            fn(rnd, rng, **chosen)
        except RoundFailed as exc:
            rnd.notes["aborted"] = str(exc)
            for p in rnd.procs:
                if p.returncode not in (None, 0) and p.kind == "hostile" and not p.killed:
                    rnd.notes["hostile_stderr"] = p.stderr_tail(1500)
        rnd.finish()
    finally:
        rnd.close(keep=keep or bool(rnd.findings))
    return rnd
