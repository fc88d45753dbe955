"""Training: records and density labels, teacher-driven data synthesis, and the joint trainer.

``records`` defines the JSONL schema, ``labels`` the density labels (Eq. 6), ``synth`` the
two-phase teacher synthesis (``prompts`` what it asks and keeps, ``teachers`` who answers),
``proxy`` the offline density proxy, ``config`` the YAML run config, ``objective`` the joint
loss, ``trainer`` the resumable loop (``optim`` its optimizer and schedule, ``runtime`` its
processes and device, ``checkpointing`` its checkpoints). Heavy modules load lazily.
"""

from .config import DataConfig, ObjectiveConfig, OptimConfig, TrainConfig, load_train_config
from .labels import DensityLabeler, density_label
from .records import RecordError, TrainingRecord, load_records, write_records

__all__ = [
    "DataConfig",
    "DensityLabeler",
    "ObjectiveConfig",
    "OptimConfig",
    "RecordError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingRecord",
    "density_label",
    "load_records",
    "load_train_config",
    "train",
    "write_records",
]


def __getattr__(name: str):
    if name in ("Trainer", "TrainResult", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
