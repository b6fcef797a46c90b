"""Warnings a careful checkpoint library gives about runs that are probably not what their author meant.

None of these situations is an error, and each is allowed to go on, but each
has cost someone a run: a ``best_metric`` that no save ever reports (so
``keep_best`` protects nothing), a step saved below the latest committed one
(a resumed loop restarting its counter), a multi-process job whose model is not
wrapped for data parallelism (each rank trains its own copy and only rank 0's
is saved; the usual accelerate-on-CPU launch mistake), and a resume that found
nothing and quietly starts from step 0. Each is said once, at WARNING, with
what to check.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Set

from torch import nn

from . import distributed as dist
from .sharded import detect
from .step.index import StepIndex
from .step.names import leftover_step, parse_step_name

logger = logging.getLogger(__name__)

__all__ = ["SaveAdvice", "PARALLEL_WRAPPERS", "explain_fresh_start", "warn_fresh_start"]

#: Class names of wrappers (anywhere in the model) that make several ranks train one model.
PARALLEL_WRAPPERS = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"})


class SaveAdvice:
    """The warnings of one manager's saves, each given at most once (the step order one each time).

    Args:
        where: The manager directory, for messages.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._said: Set[str] = set()

    def _once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)

    def before_save(self, model: Any, metrics: Optional[Mapping[str, Any]], best_metric: Optional[str],
                    keep_best: int) -> None:
        """Advice that needs only the arguments of ``save`` (every rank calls it; rank 0 speaks)."""
        if dist.get_rank() != 0:
            return
        if best_metric and (metrics is None or best_metric not in metrics):
            have = ", ".join(sorted(metrics)) if metrics else "no metrics"
            protects = f"; keep_best={keep_best} keeps only checkpoints that have it" if keep_best else ""
            self._once("best_metric", "%s: best_metric %r is not among the metrics passed to save() (%s): this "
                       "checkpoint never counts as best%s. Check the metric's name", self.where, best_metric, have,
                       protects)
        world = dist.get_world_size()
        modules = list(model.values()) if isinstance(model, Mapping) else [model]
        if world > 1 and "parallel" not in self._said and not all(_trains_one_model(m) for m in modules):
            self._once("parallel", "%s: %d processes save, but the model is neither DDP, FSDP nor DTensor-sharded: "
                       "each process trains its own copy and only rank 0's weights are saved. This is almost always "
                       "a launch mistake (with accelerate on a CPU-only machine, create Accelerator(cpu=True) in "
                       "the code so prepare() wraps the model in DDP)", self.where, world)

    def step_order(self, step: int, latest: Optional[int]) -> None:
        """Warn when ``step`` is lower than the latest committed step (rank 0, as the save starts)."""
        if latest is not None and step < latest:
            logger.warning("%s: saving step %d below the latest committed step %d; it is kept by the same "
                           "retention rules, but resume picks the highest step (%d). Did the training loop restart "
                           "its step counter?", self.where, step, latest, latest)


def _trains_one_model(model: nn.Module) -> bool:
    """True when the model is wrapped for data or model parallelism, or sharded."""
    if detect.has_dtensors(model):
        return True
    return any(type(m).__name__ in PARALLEL_WRAPPERS for m in model.modules())


def explain_fresh_start(index: StepIndex) -> str:
    """Why a resume found nothing, in words: the directory is missing, empty, or holds nothing committed.

    Reads only the listing the index made (call after a restore that returned None).
    """
    where = index.store.root
    names = [n for n in index.names if not n.startswith(".ckptmgr")]  # the lock and lease of a writer
    ours = [n for n in names if parse_step_name(n) is not None or leftover_step(n) is not None]
    if not names:
        return f"{where} is empty or does not exist yet"
    if not ours:
        return f"{where} holds {len(names)} entries, none of them a checkpoint (is it the right directory?)"
    return f"{where} holds {len(ours)} checkpoint entries, none committed (`ckptmgr ls {where}` shows them)"


def warn_fresh_start(index: StepIndex) -> None:
    """Say (rank 0, WARNING) that a restore found nothing, and why; a mistyped directory shows up here."""
    if dist.get_rank() == 0:
        logger.warning("nothing to restore: %s (a resume starts at step 0)", explain_fresh_start(index))
