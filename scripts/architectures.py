"""Regenerate docs/architectures.md and its rows (docs/architectures.json): every tiny family × built-in
quantizer through the runner's checks.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/architectures.py      # a few minutes on one core
"""

import json
import sys
import tempfile
from pathlib import Path

from qcompare.study.architectures import architecture_matrix, matrix_markdown, rows_json

if __name__ == "__main__":
    docs = Path(__file__).resolve().parent.parent / "docs"
    with tempfile.TemporaryDirectory() as folder:
        rows = architecture_matrix(Path(folder), progress=lambda f: print(f"· {f}", file=sys.stderr, flush=True))
    stored = rows_json(rows)
    (docs / "architectures.json").write_text(stored)
    (docs / "architectures.md").write_text(matrix_markdown(json.loads(stored)))
    print(f"wrote {docs / 'architectures.md'} and architectures.json")
