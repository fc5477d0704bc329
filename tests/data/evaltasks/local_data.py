"""Load a task's JSONL files relative to this folder, for tiny_gen.yaml.

lm-eval hands ``dataset_kwargs.data_files`` straight to ``datasets.load_dataset``, which
resolves relative paths against the current directory, not the YAML's folder. qcompare's
lm_eval evaluator loads tasks from their folder (tiny_mc.yaml relies on that); a
``custom_dataset`` function next to the YAML also works under plain ``lm_eval --include_path``.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def jsonl(data_files, **_metadata):
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_json(str(HERE / name)) for split, name in data_files.items()}
    )
