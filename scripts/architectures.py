"""Regenerate docs/architectures.md: every tiny family × built-in quantizer through the runner's checks.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/architectures.py      # ~40 s on 2 cores
"""

import tempfile
from pathlib import Path

from qcompare.study.architectures import architecture_matrix, matrix_markdown

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        page = matrix_markdown(architecture_matrix(Path(folder)))
    target = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
    target.write_text(page)
    print(f"wrote {target}")
