"""bestsave: keep the best model while it trains, with everything that was true at its epoch.

>>> from bestsave import BestSaver, Record, load_manifest, load_best
"""

from bestsave.lock import DirectoryLockedError
from bestsave.manifest import (
    ChecksumError,
    Manifest,
    ManifestError,
    fetch,
    load_best,
    load_manifest,
)
from bestsave.messages import BestSaveWarning
from bestsave.metrics import MissingMetricError, ScoreTypeError
from bestsave.monitor import Monitor, infer_mode
from bestsave.options import CoreOptions, Options, SaverOptions, SharedOptions
from bestsave.pipeline import Staged, WriteError
from bestsave.policy import Policy, PolicyState, Verdict
from bestsave.record import Record
from bestsave.rundir import RunExistsError
from bestsave.saver import BestSaver, Decision
from bestsave.sharded import Group, Sharded, ShardWriteError
from bestsave.tracker import Tracker

__all__ = [
    "BestSaveWarning",
    "BestSaver",
    "ChecksumError",
    "CoreOptions",
    "Decision",
    "DirectoryLockedError",
    "Group",
    "Manifest",
    "ManifestError",
    "MissingMetricError",
    "Monitor",
    "Options",
    "Policy",
    "PolicyState",
    "Record",
    "SaverOptions",
    "RunExistsError",
    "ScoreTypeError",
    "ShardWriteError",
    "Sharded",
    "SharedOptions",
    "Staged",
    "Tracker",
    "Verdict",
    "WriteError",
    "fetch",
    "infer_mode",
    "load_best",
    "load_manifest",
]
