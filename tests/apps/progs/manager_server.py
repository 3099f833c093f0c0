"""multiprocessing.managers server: a BaseManager serving a shared dict
("get_dict").  Prints "manager on port N"."""

from multiprocessing.managers import BaseManager, DictProxy

shared = {}


def get_dict():
    return shared


class Manager(BaseManager):
    pass


Manager.register("get_dict", callable=get_dict, proxytype=DictProxy)

if __name__ == "__main__":
    manager = Manager(address=("127.0.0.1", 0), authkey=b"app matrix")
    server = manager.get_server()
    print(f"manager on port {server.address[1]}", flush=True)
    server.serve_forever()
