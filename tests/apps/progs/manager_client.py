"""multiprocessing.managers client: ``manager_client.py port``: uses the
server's registered shared dict."""

import sys
from multiprocessing.managers import BaseManager, DictProxy

from appdata import blob, digest


class Manager(BaseManager):
    pass


Manager.register("get_dict", proxytype=DictProxy)

manager = Manager(address=("127.0.0.1", int(sys.argv[1])), authkey=b"app matrix")
manager.connect()
d = manager.get_dict()
for i in range(50):
    d[f"k{i}"] = i * i
d.update(big=blob(1_000_000))
assert len(d) == 51, len(d)
assert d["k7"] == 49
assert d.get("big") == blob(1_000_000)
print(f"shared dict: {len(d)} keys, big {digest(d['big'])}")
del d
print("done")
