"""Experiment trackers behind one setting, `train.report_to: [tensorboard, mlflow, wandb]`, all
offline by default: TensorBoard event files in `runs/NAME/tensorboard/`, MLflow in a SQLite
store `runs/NAME/mlflow.db` (or `runs/NAME/mlruns/` with `mlflow-skinny`, which lacks the SQL store), W&B in offline mode under
`runs/NAME/wandb/` (`wandb sync` uploads it later). None is needed unless selected; a selected one
that is not installed stops the run before it starts, with the pip command."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tunesmith.errors import TunesmithError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TunesmithError(f"train.report_to includes {name}, but the {PACKAGES[name]} package is not installed: "
                                 f"pip install {PACKAGES[name] if name != 'mlflow' else 'mlflow-skinny'}")


class Trackers:
    def __init__(self, names: list[str], run_dir: Path, config: dict, resumed: bool = False):
        self.sinks = []
        for name in names:
            self.sinks.append(getattr(self, f"_open_{name}")(run_dir, config, resumed))

    def log(self, record: dict) -> None:
        values = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for write, _ in self.sinks:
            write(values, int(record["step"]))

    def close(self) -> None:
        for _, close in self.sinks:
            close()

    @staticmethod
    def _open_tensorboard(run_dir: Path, config: dict, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not resumed:
            writer.add_text("config", "```\n" + _flat_text(config) + "\n```")

        def write(values, step):
            for k, v in values.items():
                writer.add_scalar(k, v, step)

        return write, writer.close

    @staticmethod
    def _open_mlflow(run_dir: Path, config: dict, resumed: bool):
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or mlflow_uri(run_dir))
        mlflow.set_experiment("tunesmith")
        run = mlflow.start_run(run_name=run_dir.name)
        if not resumed:
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

        def write(values, step):
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

        return write, lambda: mlflow.end_run() if mlflow.active_run() and mlflow.active_run().info.run_id == run.info.run_id else None

    @staticmethod
    def _open_wandb(run_dir: Path, config: dict, resumed: bool):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project="tunesmith", name=run_dir.name, dir=str(run_dir), config=config, reinit="finish_previous")

        def write(values, step):
            run.log(values, step=step)

        return write, run.finish


def mlflow_uri(run_dir: Path) -> str:
    """SQLite store in the run dir; `mlflow-skinny` has no SQL store, so there the file store."""
    if importlib.util.find_spec("sqlalchemy") is not None and importlib.util.find_spec("alembic") is not None:
        return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / "mlruns").resolve().as_uri()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flat_text(config: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in _flat(config).items())
