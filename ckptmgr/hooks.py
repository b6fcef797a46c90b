"""CheckpointHook: when a plain PyTorch loop saves, and a clean stop when the job is preempted.

A training loop needs three kinds of save trigger: a step or epoch count, wall
clock time, and a preemption notice (SIGTERM from Kubernetes, SLURM or
torchrun; SIGUSR1 from SLURM's ``--signal``). The last two are different on
every rank: clocks drift, and a signal may reach one rank a step before the
others. If each rank acted on its own view, one rank would enter a save (a
collective) while another trains on, and the job would hang. The hook turns
those local observations into one decision that every rank shares: rank 0's
clock decides the time trigger, and any rank's signal flag stops every rank at
the same step. It costs one tiny all-reduce per step, and only when a time or
signal trigger is configured. Writing stays with :class:`~ckptmgr.CheckpointManager`.
"""
from __future__ import annotations

import logging
import numbers
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

from . import distributed as dist
from .errors import CheckpointError
from .manager import CheckpointManager, RestoredCheckpoint
from .state.models import ModelArg, check_model
from .state.objects import check_index

logger = logging.getLogger(__name__)

__all__ = ["CheckpointHook"]

ExtraArg = Union[None, Mapping[str, Any], Callable[[], Mapping[str, Any]]]


def _positive_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def _signals(values: Optional[Iterable[Any]]) -> Tuple[signal.Signals, ...]:
    if values is None:
        return ()
    if isinstance(values, (int, signal.Signals)):
        values = (values,)
    out = []
    for value in values:
        try:
            sig = signal.Signals(value)
        except (ValueError, TypeError):
            raise ValueError(f"save_on_signals: {value!r} is not a signal of this platform") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"save_on_signals: {sig.name} cannot be caught")
        if sig not in out:
            out.append(sig)
    return tuple(out)


class CheckpointHook:
    """Decides when a training loop saves, identically on every rank, and stops it cleanly on preemption.

    Call :meth:`after_step` after every optimizer step (and :meth:`after_epoch`
    after every epoch) on every rank, with the same arguments::

        hook = CheckpointHook(manager, model=model, optimizer=opt, scheduler=sched,
                              every_n_steps=500, every_n_seconds=1800)
        for step in range(hook.resume(), total_steps):
            train_one_step(step)
            if hook.after_step(step, metrics={"loss": loss.item()}):
                break   # preempted: the checkpoint of this step is committed; exit 0
        hook.close()

    ``step`` is the index of the step that just finished (counting from 0), so
    a checkpoint saved at ``step`` resumes at ``step + 1``.

    A preemption signal only sets a flag (nothing unsafe happens inside the
    handler); the next ``after_step`` (or ``after_epoch``) on every rank sees
    that some rank was flagged, saves the current step, waits until it is
    committed and returns True. Handlers are installed only from the main
    thread (Python allows no other); a previous Python handler is still called
    after ours, and :meth:`close` puts the previous handlers back.

    Args:
        manager: The :class:`~ckptmgr.CheckpointManager` that writes and restores.
        model: The model (wrapped or not), or a dict name -> model.
        optimizer: An optimizer or a dict name -> optimizer.
        scheduler: An LR scheduler or a dict name -> scheduler.
        scaler: A grad scaler (or a dict of them).
        extra: Your state: a dict, or a callable returning one at save time
            (e.g. ``lambda: {"epoch": epoch, "sampler": sampler}``). Objects in it
            with ``state_dict``/``load_state_dict`` are restored in place by :meth:`resume`.
        every_n_steps: Save when ``(step + 1) % every_n_steps == 0``.
        every_n_epochs: Save in ``after_epoch`` when ``(epoch + 1) % every_n_epochs == 0``.
        every_n_seconds: Save when this much time passed since the last save (or
            since the hook was created or resumed), by rank 0's clock.
        save_on_signals: Signals that mean "you are about to be stopped"; empty
            or None to install no handler.
        rank_state: This rank's own state (a data loader's position), a dict or
            a callable returning one; every rank saves its own and
            :meth:`resume` gives each rank its own back (see :meth:`CheckpointManager.save`).

    Raises:
        TypeError: ``manager`` is not a CheckpointManager, ``model`` not a module
            or dict of modules, or ``extra``/``rank_state`` neither a dict nor a callable.
        ValueError: a period is not positive, or a signal cannot be caught.
    """

    def __init__(self, manager: CheckpointManager, *, model: ModelArg,
                 optimizer: Any = None, scheduler: Any = None, scaler: Any = None, extra: ExtraArg = None,
                 every_n_steps: Optional[int] = None, every_n_epochs: Optional[int] = None,
                 every_n_seconds: Optional[float] = None,
                 save_on_signals: Optional[Iterable[Any]] = (signal.SIGTERM,), rank_state: ExtraArg = None) -> None:
        if not isinstance(manager, CheckpointManager):
            raise TypeError(f"manager must be a CheckpointManager, got {type(manager).__name__}")
        check_model(model)
        for name, value in (("extra", extra), ("rank_state", rank_state)):
            if value is not None and not (isinstance(value, Mapping) or callable(value)):
                raise TypeError(f"{name} must be a dict or a callable returning one, got {type(value).__name__}")
        if every_n_seconds is not None and (isinstance(every_n_seconds, bool)
                                            or not isinstance(every_n_seconds, numbers.Real)
                                            or not every_n_seconds > 0):
            raise ValueError(f"every_n_seconds must be a positive number or None, got {every_n_seconds!r}")
        self.manager = manager
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.extra = extra
        self.rank_state = rank_state
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)
        self.every_n_seconds = None if every_n_seconds is None else float(every_n_seconds)
        self.save_on_signals = _signals(save_on_signals)
        #: True once a preemption checkpoint was saved (the loop was told to stop).
        self.preempted = False
        #: What :meth:`resume` restored (extra values, meta, metrics), or None.
        self.restored: Optional[RestoredCheckpoint] = None
        #: The last step this hook saved (or resumed from), or None.
        self.last_saved_step: Optional[int] = None
        self._received: Optional[int] = None   # signal number set by the handler, consumed by _poll
        self._previous: Dict[signal.Signals, Any] = {}
        self._clock: Callable[[], float] = time.monotonic
        self._since = self._clock()
        self._closed = False
        # Every rank must take the same collective path, so this depends on the
        # configuration only, never on whether this rank could install handlers.
        self._poll_needed = bool(self.save_on_signals) or self.every_n_seconds is not None
        self._install()

    # ------------------------------------------------------------------ signals

    def _install(self) -> None:
        if not self.save_on_signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("CheckpointHook created outside the main thread: no handler for %s installed, so "
                           "this rank cannot see preemption signals (other ranks still can)",
                           ", ".join(s.name for s in self.save_on_signals))
            return
        for sig in self.save_on_signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: the interrupted code may hold locks (logging, I/O), so
        # nothing else is safe here. A previous Python handler still runs, except
        # the default SIGINT one, whose KeyboardInterrupt would defeat the clean stop.
        self._received = signum
        previous = self._previous.get(signal.Signals(signum))
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def close(self) -> None:
        """Put back the signal handlers that were installed before this hook.

        A handler someone else installed after this hook is left alone. The
        manager is not closed (it belongs to the caller).
        """
        if self._closed:
            return
        self._closed = True
        if not self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("CheckpointHook.close() outside the main thread cannot restore signal handlers")
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "CheckpointHook":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ decisions

    def _poll(self) -> Tuple[bool, bool]:
        """``(preempt, time_due)`` as every rank sees it (collective when a signal or time trigger is set).

        The common case costs one all-reduce of one int: "does any rank want a
        save?". Only when the answer is yes does a second one tell a preemption
        (any rank flagged) from rank 0's timer. A flag set between the two votes
        is seen by the second one on every rank, so the answer stays shared.
        """
        if not self._poll_needed:
            return False, False
        flagged = self._received is not None
        due = (self.every_n_seconds is not None and dist.get_rank() == 0
               and self._clock() - self._since >= self.every_n_seconds)
        if dist.all_agree(not (flagged or due), what="CheckpointHook: is a save due"):
            return False, False
        if not self.save_on_signals:
            return False, True
        preempt = not dist.all_agree(self._received is None, what="CheckpointHook: was any rank signalled")
        return preempt, not preempt

    def after_step(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> bool:
        """Save when a trigger fires; on preemption also wait for the commit and return True.

        Every rank must call it after every step, with the same ``step``.

        Args:
            step: Index of the step that just finished (from 0).
            metrics: Numbers recorded in the manifest (for ``best_metric`` retention).

        Returns:
            True when a preemption checkpoint of ``step`` is committed and the
            loop should stop; False otherwise (a periodic save may have happened).

        Raises:
            CheckpointError: the save failed (on every rank; see :meth:`CheckpointManager.save`).
        """
        step = check_index("step", step)
        due = self.every_n_steps is not None and (step + 1) % self.every_n_steps == 0
        return self._decide(step, metrics, "every_n_steps" if due else None, epoch=None)

    def after_epoch(self, epoch: int, step: int, metrics: Optional[Mapping[str, Any]] = None) -> bool:
        """Like :meth:`after_step`, with the ``every_n_epochs`` rule.

        A step already saved by :meth:`after_step` is not saved twice.

        Args:
            epoch: Index of the epoch that just finished (from 0).
            step: Index of the last step of that epoch.
            metrics: Numbers recorded in the manifest.

        Returns:
            True when a preemption checkpoint is committed and the loop should stop.
        """
        epoch = check_index("epoch", epoch)
        step = check_index("step", step)
        due = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        return self._decide(step, metrics, "every_n_epochs" if due else None, epoch=epoch)

    def _decide(self, step: int, metrics: Optional[Mapping[str, Any]], rule: Optional[str],
                epoch: Optional[int]) -> bool:
        if self._closed:
            raise CheckpointError("this CheckpointHook is closed", "create a new one for the next run")
        preempt, timed = self._poll()
        if preempt:
            signum, self._received = self._received, None
            source = signal.Signals(signum).name if signum is not None else "another rank's signal"
            logger.warning("preemption (%s): saving step %d and stopping", source, step)
            self._save(step, metrics, "preemption", epoch, signal_name=source)
            self.manager.wait()   # durable before the loop (and the process) ends
            self.preempted = True
            return True
        if rule is not None or timed:
            self._save(step, metrics, rule or "every_n_seconds", epoch)
        return False

    def _save(self, step: int, metrics: Optional[Mapping[str, Any]], trigger: str, epoch: Optional[int],
              signal_name: Optional[str] = None) -> None:
        if step == self.last_saved_step:
            logger.debug("step %d is already saved; not saving it again (%s)", step, trigger)
            return
        extra = self.extra() if callable(self.extra) else self.extra
        meta: Dict[str, Any] = {"trigger": trigger}
        if epoch is not None:
            meta["epoch"] = epoch
        if signal_name is not None:
            meta["signal"] = signal_name
        self.manager.save(step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                          scaler=self.scaler, extra=extra, metrics=metrics, meta=meta, rank_state=self.rank_state)
        self.last_saved_step = step
        self._since = self._clock()

    # ------------------------------------------------------------------ resume

    def resume(self, **kwargs: Any) -> int:
        """Restore the newest good checkpoint into the hook's objects; return the step to start from.

        Every rank must call it. Objects with ``load_state_dict`` in ``extra``
        and ``rank_state`` (for a callable, in what it returns now) are loaded
        in place; all saved values are in ``hook.restored.extra`` and
        ``hook.restored.rank_state``.

        Args:
            **kwargs: ``step``, ``strict``, ``verify``, ``map_location``,
                ``on_world_size_change`` for :meth:`CheckpointManager.restore`.

        Returns:
            The restored step + 1, or 0 when the directory has no checkpoint yet.

        Raises:
            CheckpointError: see :meth:`CheckpointManager.restore`.
        """
        targets = self.extra() if callable(self.extra) else self.extra
        rank_targets = self.rank_state() if callable(self.rank_state) else self.rank_state
        self.restored = self.manager.restore(model=self.model, optimizer=self.optimizer,
                                             scheduler=self.scheduler, scaler=self.scaler, extra=targets,
                                             rank_state=rank_targets, **kwargs)
        self._since = self._clock()
        if self.restored is None:
            return 0
        self.last_saved_step = self.restored.step
        return self.restored.step + 1

    def __repr__(self) -> str:
        rules = {k: v for k, v in (("every_n_steps", self.every_n_steps), ("every_n_epochs", self.every_n_epochs),
                                   ("every_n_seconds", self.every_n_seconds)) if v is not None}
        signals = [s.name for s in self.save_on_signals]
        return f"CheckpointHook({self.manager!r}, {rules}, save_on_signals={signals})"
