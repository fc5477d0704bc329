"""Experiment trackers: each cell's evaluation results, logged to the run its trainer opened.

The distillers hand the recipe's ``report_to`` and the cell's ``run_name`` to TRL's
TrainingArguments, so transformers' own callbacks log training (TensorBoard events land in
``<cell>/tensorboard``). When the cell ends, this plugin logs the evaluation results, their
stderr, the size and the cost to the same tracker(s) under the same run name: one run per
cell, training curves and final scores together. Tracker packages are imported lazily.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from qcompare.sdk import CellFiles, hookimpl, installed, require, TRACKERS


def scalars(record: dict) -> dict[str, float]:
    """What a finished cell reports: ``eval/<task>/<metric>`` (and ``…_stderr``), size and cost."""
    out = {f"eval/{k}": float(v) for k, v in record.get("metrics", {}).items()}
    out.update({f"eval/{k}_stderr": float(v) for k, v in record.get("stderr", {}).items() if v is not None})
    out.update({f"size/{k}": float(v) for k, v in record.get("size", {}).items() if isinstance(v, (int, float))})
    out.update({f"cost/{k}": float(v) for k, v in record.get("cost", {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def last_step(cell_dir: Path) -> int:
    """The trainer's last logged step, so eval points sit at the end of the training curve."""
    log = CellFiles(cell_dir).read_train_log()
    return int(log[-1]["step"]) if log else 0


def to_tensorboard(cell_dir: Path, record: dict, run_name: str, values: dict, step: int) -> None:
    require(*TRACKERS["tensorboard"], "report_to 'tensorboard'")
    from torch.utils.tensorboard import SummaryWriter

    # the trainer's TensorBoardCallback writes to this folder too (plugins/distillers/common.py)
    writer = SummaryWriter(log_dir=str(CellFiles(cell_dir).tensorboard))
    try:
        for key, value in values.items():
            writer.add_scalar(key, value, global_step=step)
        writer.add_text("qcompare/settings", f"{run_name}\n\n```\n{json.dumps(record['settings'], indent=2)}\n```", step)
    finally:
        writer.close()


def to_wandb(cell_dir: Path, record: dict, run_name: str, values: dict, step: int) -> None:
    wandb = require(*TRACKERS["wandb"], "report_to 'wandb'")
    run = wandb.run
    if run is None or run.name != run_name:  # the trainer's run is gone (or never was: no training)
        if run is not None:
            run.finish()
        run = wandb.init(name=run_name, config=record["settings"])
    run.log(values, step=step)
    run.summary.update(values)
    run.finish()


def to_mlflow(cell_dir: Path, record: dict, run_name: str, values: dict, step: int) -> None:
    mlflow = require(*TRACKERS["mlflow"], "report_to 'mlflow'")
    active = mlflow.active_run()
    if active is None or active.info.run_name != run_name:
        if active is not None:
            mlflow.end_run()
        mlflow.start_run(run_name=run_name)
    mlflow.log_metrics(values, step=step)
    mlflow.set_tags({"qcompare.cell": record["id"], "qcompare.status": record["status"]})
    mlflow.end_run()


WRITERS = {"tensorboard": to_tensorboard, "wandb": to_wandb, "mlflow": to_mlflow}


@hookimpl
def cell_finished(cell, cell_dir, record, report_to, run_name):
    """Log a finished cell's evaluation results to the recipe's trackers."""
    wanted = set(report_to or ())
    if record.get("status") != "done" or not wanted or wanted == {"none"}:
        return
    if "all" in wanted:  # transformers' "all": every integration that is installed
        wanted |= {name for name in WRITERS if installed(TRACKERS[name][0])}
    values, step = scalars(record), last_step(cell_dir)
    for name in sorted(wanted & set(WRITERS)):
        try:
            WRITERS[name](cell_dir, record, run_name, values, step)
        except Exception as e:  # a tracker that fails (offline server…) must not stop the sweep
            warnings.warn(f"trackers: logging cell {record['id']} to {name} failed: {e}", stacklevel=2)
