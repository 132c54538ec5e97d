"""Training loops over pure steps: ``Trainer``, callbacks, evaluation, progress.

Example:
    >>> from craftfn.training import Trainer, ConsoleLogger, EarlyStopping
"""

from craftfn.training.callbacks import (
    Callback,
    CallbackList,
    ConsoleLogger,
    EarlyStopping,
    JSONLLogger,
    NanGuard,
    ProgressBar,
    SampleText,
    SaveWeights,
    TensorBoardLogger,
    generate_tokens,
)
from craftfn.training.checkpointing import (
    CheckpointManager,
    CheckpointMismatchError,
    CorruptCheckpointError,
    export_params,
    load_exported,
)
from craftfn.training.evaluation import Evaluator
from craftfn.training.events import TrainerView
from craftfn.training.progress import ProgressTracker, default_peak_flops
from craftfn.training.runlock import RunDirLock, RunDirLockedError
from craftfn.training.trainer import Event, Trainer, TrainingInterrupted, count_tokens, learning_rate_of

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "TrainerView",
    "Event",
    "Evaluator",
    "ProgressTracker",
    "default_peak_flops",
    "Callback",
    "CallbackList",
    "ConsoleLogger",
    "JSONLLogger",
    "TensorBoardLogger",
    "EarlyStopping",
    "NanGuard",
    "SampleText",
    "SaveWeights",
    "ProgressBar",
    "generate_tokens",
    "count_tokens",
    "learning_rate_of",
    "CheckpointManager",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "export_params",
    "load_exported",
    "RunDirLock",
    "RunDirLockedError",
]
