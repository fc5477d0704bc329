"""Load the toy tasks' JSONL from beside this file, wherever the package is installed.

lm-eval passes ``dataset_kwargs`` to a ``custom_dataset`` callable; a relative
``data_files`` would resolve against the working directory instead, and an absolute one
would break on another machine.
"""

from pathlib import Path

import datasets

DATA = Path(__file__).parent / "data"


def load(file: str, **_metadata) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA / file))})
