"""Does saved state fit the live objects? Every check a restore can make before it changes anything.

A restore that fails half-way leaves a model with new weights and an
optimizer in an impossible state (SGD's param groups inside an Adam, whose
next ``step()`` raises ``KeyError: 'betas'``). So everything that can be
known from the saved structure alone (which class an optimizer or scheduler
state came from, how many param groups and parameters it has, which objects
were saved under which names) is checked here, before the step layer reads
tensor data into live tensors or applies anything. The functions take state
trees whose tensors may be data-less stand-ins (``device='meta'``), so the
step layer can run them on file headers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from ..errors import CheckpointFormatError

__all__ = ["class_name", "check_saved", "CHECKED_CLASSES"]

#: Components whose saved class must be the class of the object restored into.
CHECKED_CLASSES = ("optimizer", "scheduler")

# param_group entries that a framework or a newer torch adds, never a sign of another optimizer class
_ADDED_KEYS = {"params", "param_names", "initial_lr"}


def _inner(obj: Any) -> Any:
    """The object whose class matters: wrappers (accelerate's AcceleratedOptimizer/-Scheduler) peeled off."""
    for _ in range(8):
        inner = getattr(obj, "optimizer", None)
        if hasattr(obj, "param_groups") and inner is not None and hasattr(inner, "param_groups") and inner is not obj:
            obj = inner  # an optimizer that wraps an optimizer (a scheduler's .optimizer is not a wrapper)
            continue
        inner = getattr(obj, "scheduler", None)
        if inner is not None and callable(getattr(inner, "state_dict", None)) and inner is not obj:
            obj = inner
            continue
        break
    return obj


# wrappers whose saved state is their inner optimizer's, consolidated (state/engines saves ZeRO that way)
_SHARDING_WRAPPERS = ("ZeroRedundancyOptimizer",)


def class_name(obj: Any) -> str:
    """The class recorded for a saved object (``'SGD'``, ``'CosineAnnealingLR'``); wrappers peeled off.

    A ``ZeroRedundancyOptimizer`` is named by the optimizer it shards (``'Adam'``): its consolidated
    state is that optimizer's, and restores into a plain one as well as into another ZeRO.
    """
    inner = _inner(obj)
    local = getattr(inner, "optim", None)
    if type(inner).__qualname__ in _SHARDING_WRAPPERS and local is not None:
        return type(local).__qualname__
    return type(inner).__qualname__


def check_saved(single: bool, objs: Mapping[str, Any], saved: Optional[Mapping[str, Any]], what: str,
                strict: bool) -> bool:
    """Check that ``saved`` (a component as :func:`ckptmgr.state.objects.named_state` wrote it) fits ``objs``.

    Args:
        single: The caller passed one object (not a dict of them).
        objs: Name -> live object.
        saved: The saved component (tensors may be stand-ins), or None when the step has none.
        what: Component name (``'optimizer'``, ``'scheduler'``, ...).
        strict: A missing component is an error (else it is skipped).

    Returns:
        True when there is state to load.

    Raises:
        CheckpointFormatError: the component is missing (``strict``), was saved as one object but
            restored into a dict or the other way round, lacks a requested name, comes from another
            class, or (optimizers) has other param groups.
    """
    if saved is None:
        if strict:
            raise CheckpointFormatError(f"the checkpoint holds no {what} state",
                                        f"pass {what}=None, or strict=False to skip it")
        return False
    states = saved.get("states") or {}
    if bool(saved.get("single")) != single:
        have = "one object" if saved.get("single") else f"a dict with keys {sorted(states)}"
        raise CheckpointFormatError(f"{what} was saved as {have} but restored into "
                                    f"{'one object' if single else 'a dict'}",
                                    f"pass {what} the same way it was passed to save()")
    missing = [name for name in objs if name not in states]
    if missing:
        raise CheckpointFormatError(f"the checkpoint has no {what} state for {missing}; it has {sorted(states)}",
                                    f"use the names passed to save() for {what}")
    classes = saved.get("classes") or {}
    for name, obj in objs.items():
        recorded = classes.get(name) if isinstance(classes, Mapping) else None
        if (what in CHECKED_CLASSES and isinstance(recorded, str) and recorded not in _SHARDING_WRAPPERS
                and recorded != class_name(obj)):
            raise CheckpointFormatError(f"the checkpoint holds {recorded} state for {what} {name!r}; got "
                                        f"{class_name(obj)}",
                                        f"restore into a {recorded}, or pass {what}=None to restore without it")
        groups = getattr(_inner(obj), "param_groups", None)
        if isinstance(groups, list) and isinstance(states[name], Mapping):
            _check_groups(groups, states[name], f"{what} {name!r}", class_name(obj), legacy=recorded is None)
    return True


def _check_groups(live: List[Dict[str, Any]], state: Mapping[str, Any], label: str, cls: str, legacy: bool) -> None:
    saved = state.get("param_groups")
    if not isinstance(saved, list):
        raise CheckpointFormatError(f"the checkpoint's state for {label} has no param groups: it is not "
                                    f"optimizer state", f"pass the object it was saved from as {label.split()[0]}")
    if legacy:  # a step written before classes were recorded: tell the class by the hyper-parameters
        _check_settings(live, saved, label, cls)
    if len(saved) != len(live):
        raise CheckpointFormatError(f"the checkpoint's {label} has {len(saved)} param group(s); the one passed has "
                                    f"{len(live)}", "build the optimizer with the same param groups as when saving")
    for i, (old, new) in enumerate(zip(saved, live)):
        have, want = len(old.get("params") or ()), len(new.get("params") or ())
        if have != want:
            raise CheckpointFormatError(f"param group {i} of the checkpoint's {label} has {have} parameter(s); the "
                                        f"one passed has {want}",
                                        "build the model and optimizer the way they were built when saving")


def _check_settings(live: List[Dict[str, Any]], saved: List[Any], label: str, cls: str) -> None:
    """Another optimizer class has settings this one does not know *and* lacks some this one needs."""
    if not live or not saved or not isinstance(saved[0], Mapping):
        return
    own, theirs = live[0], saved[0]
    foreign = sorted(k for k in theirs if k not in own and k not in _ADDED_KEYS)
    lacking = sorted(k for k, v in own.items() if k not in theirs and k not in _ADDED_KEYS
                     and not (v is None or isinstance(v, bool)))
    if foreign and lacking:
        raise CheckpointFormatError(f"the checkpoint's state for {label} has settings {foreign} that {cls} does "
                                    f"not have and lacks {lacking}: it was saved from another optimizer class",
                                    f"restore into the optimizer class it was saved from, or pass "
                                    f"{label.split()[0]}=None to restore without it")
