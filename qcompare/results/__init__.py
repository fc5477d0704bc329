"""A run folder: its files (``store``), a cell's record (``record``), the run as a DataFrame (``frame``)
and the statistics behind a table's ``±`` (``stats``).

The notebook API is here::

    from qcompare.results import load_run
    df = load_run("runs/toy_int4")

(``load_run``, ``primary_metrics``, ``group_columns``: imported from ``frame`` on first use, so the
record and store modules load without pandas.)
"""

NOTEBOOK = ("load_run", "primary_metrics", "group_columns")


def __getattr__(name: str):
    if name in NOTEBOOK:
        from qcompare.results import frame

        return getattr(frame, name)
    raise AttributeError(f"module 'qcompare.results' has no attribute {name!r}")
