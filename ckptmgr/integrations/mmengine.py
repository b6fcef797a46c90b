"""mmengine's Runner with ckptmgr checkpoints: a checkpoint hook and loaders for ``load_from``.

Two lines in a config::

    custom_imports = dict(imports=["ckptmgr.integrations.mmengine"])
    default_hooks = dict(checkpoint=dict(type="CkptmgrHook", interval=1, max_keep_ckpts=3, save_best="auto"))

:class:`CkptmgrHook` replaces mmengine's ``CheckpointHook`` (same arguments,
same schedule). Every checkpoint is a :class:`~ckptmgr.CheckpointManager`
step: model, optimizer wrapper, parameter schedulers, message hub and meta,
committed atomically with checksums, plus every rank's RNG streams; retention
(``max_keep_ckpts``, the best by ``save_best``) runs after the new checkpoint
committed. ``resume=True`` works unchanged: the hook points
``work_dir/last_checkpoint`` at ``ckptmgr:<step>`` (the newest step that
verifies, checked before the Runner resumes) and the ``ckptmgr:`` loader
rebuilds the dict ``Runner.resume`` expects, without pickle.

:func:`register_loaders` makes ``load_from`` and mmengine's ``CheckpointLoader``
go through ckptmgr's loaders for every scheme ckptmgr knows (``s3://`` and
other fsspec URLs, ``http(s)://`` with the download cache and mirrors, model
zoo names), with ``weights_only`` loading.

Importing this module imports mmengine and registers ``CkptmgrHook`` in its
``HOOKS`` registry and the ``ckptmgr:`` scheme in its ``CheckpointLoader``
(a new key; nothing of mmengine's is replaced until :func:`register_loaders`);
without mmengine it raises :class:`~ckptmgr.errors.MissingDependencyError`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from ..errors import MissingDependencyError
from ..io.access import open_store
from ..io.local import LocalStore
from ..io.store import Options
from ..io.uri import join
from ..manager import CheckpointManager
from ..state.objects import apply_rng
from ..step.names import step_name
from ._mmloading import SCHEME, encode, load_from_ckptmgr, newest_verified, register_loaders

try:  # _mmloading raised MissingDependencyError already if mmengine is missing
    import mmengine
    from mmengine.dist import barrier, is_main_process
    from mmengine.hooks import CheckpointHook
    from mmengine.model import is_model_wrapper
    from mmengine.registry import HOOKS
    from mmengine.runner.checkpoint import weights_to_cpu
except ImportError as _exc:  # pragma: no cover - a partial mmengine install
    raise MissingDependencyError("ckptmgr.integrations.mmengine needs mmengine, which is not installed",
                                 "pip install 'ckptmgr[mmengine]'") from _exc

logger = logging.getLogger(__name__)

__all__ = ["SCHEME", "CkptmgrHook", "load_from_ckptmgr", "register_loaders"]
_BEST_INFO = "ckptmgr_best"  # message-hub key: the metric and rule "auto" resolved to (so resume keeps it)


# --------------------------------------------------------------------------- collected state


class _Saved:
    """Already collected state in the shape the manager collects from (``state_dict()``)."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, state: Any) -> None:
        self._state = state


class _Weights(nn.Module):
    """The weights the hooks saw (EMAHook swaps values in the checkpoint dict), saved as the model."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        super().__init__()
        self._weights = state

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._weights


# --------------------------------------------------------------------------- the hook


@HOOKS.register_module()
class CkptmgrHook(CheckpointHook):
    """mmengine's ``CheckpointHook``, saving through a :class:`~ckptmgr.CheckpointManager`.

    Arguments are those of ``CheckpointHook`` (interval, by_epoch, max_keep_ckpts,
    save_last, save_best, rule, greater_keys, less_keys, save_begin,
    save_optimizer, save_param_scheduler, out_dir). Checkpoints go to
    ``work_dir/checkpoints/step_<epoch or iter>`` (or ``out_dir/<work_dir name>/``).
    The best checkpoint by ``save_best`` (one metric) is a step kept by
    retention, its metric recorded in the manifest, not a separate file.

    Args:
        async_save: Save in the background (see ``CheckpointManager(async_save=True)``).
        storage_options: fsspec options when ``out_dir`` is a URL.

    Raises:
        ValueError: an argument this hook does not support (``filename_tmpl``,
            ``published_keys``, file backends, more than one ``save_best`` metric).
    """

    priority = "VERY_LOW"  # after ParamSchedulerHook: the schedulers have stepped when we save

    def __init__(self, interval: int = -1, by_epoch: bool = True, save_optimizer: bool = True,
                 save_param_scheduler: bool = True, out_dir: Optional[str] = None, max_keep_ckpts: int = -1,
                 save_last: bool = True, save_best: Any = None, rule: Any = None, greater_keys: Any = None,
                 less_keys: Any = None, save_begin: int = 0, *, async_save: bool = False,
                 storage_options: Options = None, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"CkptmgrHook does not support {sorted(kwargs)}: checkpoints are ckptmgr steps "
                             "(use `ckptmgr publish` or `ckptmgr convert` to hand out weights)")
        if isinstance(save_best, (list, tuple)) and len(save_best) > 1:
            raise ValueError("CkptmgrHook keeps the best checkpoint by one metric; pass save_best='<metric>'")
        super().__init__(interval=interval, by_epoch=by_epoch, save_optimizer=save_optimizer,
                         save_param_scheduler=save_param_scheduler, out_dir=out_dir, max_keep_ckpts=max_keep_ckpts,
                         save_last=save_last, save_best=save_best, rule=rule, greater_keys=greater_keys,
                         less_keys=less_keys, save_begin=save_begin)
        self._given_out_dir = None if out_dir is None else str(out_dir)
        self.async_save = bool(async_save)
        self.storage_options = storage_options
        self.manager: Optional[CheckpointManager] = None
        self._rng: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ where, and resume

    def before_run(self, runner: Any) -> None:
        """Pick the directory; point ``last_checkpoint`` at the newest step that verifies (before resume reads it)."""
        given = self._given_out_dir
        self.out_dir = os.path.join(runner.work_dir, "checkpoints") if given is None else \
            join(given, os.path.basename(runner.work_dir.rstrip(os.sep)))
        runner.logger.info(f"Checkpoints will be saved to {self.out_dir} by ckptmgr.")
        if is_main_process():
            store = open_store(self.out_dir, self.storage_options)
            found = newest_verified(store) if store.isdir() else None
            if found is not None:
                self._write_last(runner, SCHEME + store.uri(step_name(found)))
        barrier()

    def _write_last(self, runner: Any, target: str) -> None:
        LocalStore(runner.work_dir).write_bytes("last_checkpoint", target.encode("utf-8"))

    def after_load_checkpoint(self, runner: Any, checkpoint: Dict[str, Any]) -> None:
        """Take the RNG streams a ``ckptmgr:`` checkpoint carries; they are applied when training starts."""
        info = checkpoint.pop("ckptmgr", None)
        self._rng = info.get("rng") if isinstance(info, dict) else None

    def before_train(self, runner: Any) -> None:
        """Open the manager (retention as configured); put back the RNG streams of a resumed step."""
        self._open(runner)
        if self._rng is not None:
            apply_rng(self._rng)
            self._rng = None

    def _best(self, runner: Any) -> Tuple[Optional[str], str]:
        if not self.save_best:
            return None, "min"
        key, rule = self.key_indicators[0], self.rules[0]
        if key == "auto":
            resolved = runner.message_hub.get_info(_BEST_INFO) or {}
            key, rule = resolved.get("key"), resolved.get("rule")
        return key, "max" if rule == "greater" else "min"

    def _open(self, runner: Any) -> CheckpointManager:
        if self.manager is None:
            metric, mode = self._best(runner)
            self.manager = CheckpointManager(
                self.out_dir, max_to_keep=self.max_keep_ckpts if self.max_keep_ckpts > 0 else None,
                best_metric=metric, best_mode=mode, keep_best=1 if metric else 0, async_save=self.async_save,
                storage_options=self.storage_options)
        return self.manager

    def close(self) -> None:
        """Finish pending saves and release the directory (``after_run`` calls it; call it if ``train()`` raised)."""
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()

    def after_run(self, runner: Any) -> None:
        """Wait for a background save, then record the newest step in ``last_checkpoint``."""
        manager = self.manager
        self.close()
        if manager is not None and self.async_save and is_main_process():
            latest = manager.latest_step()
            if latest is not None:
                self._write_last(runner, SCHEME + join(manager.directory, step_name(latest)))

    # ------------------------------------------------------------------ saving

    def _collect(self, runner: Any, meta: Dict[str, Any]) -> Dict[str, Any]:
        """What ``Runner.save_checkpoint`` would write, without writing it (``before_save_checkpoint`` included)."""
        from mmengine.utils import get_git_hash
        meta = dict(meta, cfg=runner.cfg.pretty_text, seed=runner.seed, experiment_name=runner.experiment_name,
                    time=time.strftime("%Y%m%d_%H%M%S", time.localtime()),
                    mmengine_version=mmengine.__version__ + get_git_hash())
        dataset: Any = getattr(runner.train_dataloader, "dataset", None)
        if hasattr(dataset, "metainfo"):
            meta["dataset_meta"] = dataset.metainfo
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        checkpoint: Dict[str, Any] = {"meta": meta, "state_dict": weights_to_cpu(model.state_dict()),
                                      "message_hub": runner.message_hub.state_dict()}
        if self.save_optimizer:
            checkpoint["optimizer"] = runner.optim_wrapper.state_dict()
        schedulers = runner.param_schedulers
        if self.save_param_scheduler and schedulers is not None:
            checkpoint["param_schedulers"] = {n: [s.state_dict() for s in group] for n, group in schedulers.items()} \
                if isinstance(schedulers, dict) else [s.state_dict() for s in schedulers]
        runner.call_hook("before_save_checkpoint", checkpoint=checkpoint)
        return checkpoint

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: Dict[str, Any],
                                   metrics: Optional[Dict[str, Any]] = None) -> None:
        manager = self._open(runner)
        self.last_ckpt = SCHEME + join(manager.directory, step_name(step))
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        checkpoint = self._collect(runner, meta)
        optimizer, schedulers = checkpoint.pop("optimizer", None), checkpoint.pop("param_schedulers", None)
        manager.save(step, model=_Weights(checkpoint.pop("state_dict")),
                     optimizer=None if optimizer is None else _Saved(encode(optimizer)),
                     scheduler=None if schedulers is None else _Saved(encode(schedulers)),
                     extra={"mmengine": encode(checkpoint)}, metrics=metrics,
                     meta={"epoch": meta.get("epoch"), "iter": meta.get("iter")}, force=True)
        if is_main_process() and not self.async_save:
            self._write_last(runner, self.last_ckpt)

    def _save_best_checkpoint(self, runner: Any, metrics: Dict[str, Any]) -> None:
        if not self.save_best:
            return
        if "auto" in self.key_indicators:
            self._init_rule(self.rules, [next(iter(metrics))])
        key, rule = self.key_indicators[0], self.rules[0]
        score = metrics.get(key)
        best = runner.message_hub.get_info("best_score", self.init_value_map[rule])
        if score is None or not self.is_better_than[key](score, best):
            return
        if runner.message_hub.get_info(_BEST_INFO) != {"key": key, "rule": rule}:
            runner.message_hub.update_info(_BEST_INFO, {"key": key, "rule": rule})
            self.close()  # "auto" resolved: reopen with retention that keeps the best
        step = runner.epoch if self.by_epoch else runner.iter
        runner.message_hub.update_info("best_score", score)
        self.best_ckpt_path = SCHEME + join(self._open(runner).directory, step_name(step))
        runner.message_hub.update_info("best_ckpt", self.best_ckpt_path)
        self._save_checkpoint_with_step(runner, step, dict(epoch=runner.epoch, iter=runner.iter), {key: score})
        runner.logger.info(f"The best checkpoint with {score:0.4f} {key} at {step} "
                           f"{'epoch' if self.by_epoch else 'iter'} is {self.best_ckpt_path}.")
