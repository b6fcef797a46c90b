"""How the ``ckptmgr`` command shows things: sizes, times, metrics, tables, optimizer summaries, JSON."""
from __future__ import annotations

import json
from typing import Any, List, Mapping, Optional, Sequence

__all__ = ["size", "when", "metrics", "print_json", "inline", "print_table", "print_optimizers"]


def size(n: Optional[float]) -> str:
    """Bytes for people: ``1.5 MiB``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(iso: str) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS`` (UTC; tiered saves record microseconds, not shown)."""
    return iso.replace("T", " ")[:19] if iso else "-"


def metrics(values: Mapping[str, Any]) -> str:
    """``loss=0.5, acc=0.9`` (4 significant digits for floats)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "-"


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    print(json.dumps(data, indent=2))


def inline(value: Any) -> str:
    """A value on one line (JSON for containers)."""
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def print_table(rows: Sequence[Sequence[str]], right: Sequence[int] = (0,)) -> None:
    """Print rows (the first is the header) as aligned columns, indented by two spaces."""
    if not rows:
        return
    widths: List[int] = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print(("  " + "  ".join(cells)).rstrip())


def print_optimizers(kind: str, summary: Mapping[str, Any]) -> None:
    """Param groups and per-parameter state of optimizers, as ``ckptmgr inspect`` shows them."""
    for name, opt in summary.items():
        if "param_groups" not in opt:
            print(f"{kind} {name!r}: {inline(opt)}")
            continue
        state = f", state for {opt['params_with_state']} params ({', '.join(opt['state_keys'])})" \
            if opt["params_with_state"] else ""
        print(f"{kind} {name!r}: {len(opt['param_groups'])} param group(s){state}")
        for i, group in enumerate(opt["param_groups"]):
            hyper = ", ".join(f"{k}={inline(v)}" for k, v in group.items()
                              if k != "params" and v is not None and v is not False)   # unset switches are noise
            print(f"  group {i}: {group['params']} params, {hyper}")
