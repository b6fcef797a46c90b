"""Warm start: a fresh run takes its first weights from elsewhere, then resumes from its own checkpoints.

Fine-tuning starts from someone else's weights (a zoo model, a file on a web
server, another run's manager directory on S3) and must then resume from its
own checkpoints after a restart. Written by hand, those are two code paths
that drift apart (mmcv's ``load_from`` vs ``resume_from``, torchtitan's
``initial_load_path``). ``CheckpointManager(init_from=URI)`` makes it one:
:class:`WarmStart` is used only while the run's directory holds no committed
step, and loads through the loader registry like ``load_checkpoint`` does
(so every scheme works, and downloads happen once per node, local rank 0 first).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Tuple

from torch import nn

from .checkpoint import extract_state_dict
from .distributed import agree, is_rank_zero
from .errors import CheckpointFormatError
from .io.store import Options
from .loaders.registry import CheckpointLoader
from .state.keys import revise_keys
from .state.modules import LoadReport
from .state.partial import NOTHING, Exclusion, apply_model_state

logger = logging.getLogger(__name__)

__all__ = ["WarmStart", "DEFAULT_REVISE_KEYS"]

#: What ``load_checkpoint`` strips by default: a DDP ``module.`` prefix.
DEFAULT_REVISE_KEYS: Tuple[Tuple[str, str], ...] = ((r"^module\.", ""),)


@dataclass
class WarmStart:
    """Where a fresh run's model weights come from, and how their keys are renamed.

    Args:
        source: Any URI the loader registry handles: a path, a ``.pth``/``.safetensors``
            file, a manager or step directory (local or ``s3://``), ``http(s)://``,
            a zoo name (``torchvision://resnet50``), a registered scheme.
        revise_keys: ``(regex, replacement)`` rules applied in order to the source's keys.
        storage_options: fsspec options for a URL source.
    """

    source: str
    revise_keys: Sequence[Tuple[str, str]] = DEFAULT_REVISE_KEYS
    storage_options: Options = None

    @classmethod
    def of(cls, source: Any, rules: Iterable[Tuple[str, str]] = DEFAULT_REVISE_KEYS,
           storage_options: Options = None) -> "WarmStart":
        """Build one from the manager's arguments (``source`` may be a PathLike).

        Raises:
            TypeError: ``source`` is not a string or path.
        """
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"init_from must be a path or URI, got {type(source).__name__}")
        return cls(os.fspath(source), tuple(tuple(r) for r in rules or ()), storage_options)  # type: ignore[misc]

    def load(self, model: Any, exclusion: Exclusion = NOTHING) -> LoadReport:
        """Load the source's model weights into ``model`` (every rank calls it; an error on one raises on all).

        Keys that do not match are loaded as far as they go and listed in the log
        (a warm start usually brings a new head): missing, unexpected and
        mis-shaped keys never raise. Model keys ``exclusion`` matches are left untouched.

        Returns:
            What did not match.

        Raises:
            CheckpointNotFoundError, DownloadError, UnsafeCheckpointError, CheckpointFormatError: the
                source cannot be loaded (on every rank).
        """
        what = f"warm start from {self.source}"
        if not isinstance(model, nn.Module):
            raise CheckpointFormatError("init_from warm-starts one model, but model is a dict of models",
                                        "pass model=<the module init_from is for>, or load each model's weights "
                                        "with ckptmgr.load_checkpoint before training")
        reports = []
        if exclusion.drops("model"):
            logger.info("%s skipped: exclude names the model", what)
            return LoadReport()

        def run() -> None:
            checkpoint = CheckpointLoader.load_checkpoint(self.source, map_location="cpu", logger="silent",
                                                          storage_options=self.storage_options)
            state = revise_keys(extract_state_dict(checkpoint, self.source), self.revise_keys)
            reports.append(apply_model_state(model, state, None, strict=False, exclusion=exclusion, what=what))
        agree(what, run)
        report = reports[0]
        if is_rank_zero():
            if report.ok:
                logger.info("%s: every model key loaded", what)
            else:
                logger.warning("%s: the model and the source do not match exactly (loaded what matches)\n%s",
                               what, report.summary())
        return report

    def skipped(self, step: int, directory: str) -> None:
        """Log (INFO) that a committed step is restored instead of the source."""
        logger.info("resuming from step %d of %s; init_from %s is only for a fresh run, not used", step,
                    directory, self.source)
