"""The benchmarks of shrimpio: ``shrimpio bench`` and its parts.

* ``runner``  - ``shrimpio bench``: measures the rows, prints the table and goals;
* ``spec``    - what a row is before it is measured (``Settings``, ``Spec``);
* ``rows/``   - one module per family of rows, each also a benchmark of its own
  (``vmmc``: ``shrimpio pingpong``; ``sockets``: ``shrimpio bench-socket``;
  ``aio``: ``shrimpio bench-asyncio``; ``connect``, ``web``, ``msg``,
  ``scale``; ``zmq_ipc`` a peer; ``tls``: ``python -m shrimpio.bench.rows.tls``);
* ``table``   - the result model (``Row``, ``Figure``) and the text table;
* ``goals``   - the issues' performance goals, checked against a run;
* ``plot``    - ``--plot``: a chart of a run (needs matplotlib);
* ``common``  - pinning, statistics, the machine, a private registry.

Nothing in ``shrimpio`` imports this package: it is a client of the layers
it measures.
"""
