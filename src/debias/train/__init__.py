"""Training: :mod:`~debias.train.loop` (the Trainer and :func:`~debias.train.loop.train`),
:mod:`~debias.train.state` (random streams, data order, EMA), :mod:`~debias.train.logs` (TSV logs) and
:mod:`~debias.train.rundir` (the run folder: lock, resume, export)."""
