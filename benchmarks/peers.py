"""The peers ckptmgr is measured against, each used the way its documentation shows, every save durable.

* torch: ``torch.save({'model': ..., 'optimizer': ...})`` then an fsync of the
  file; ``torch.load(weights_only=True)`` then ``load_state_dict`` on both.
* DCP: ``get_state_dict`` + ``dcp.save`` (its FileSystemWriter fsyncs every
  file); ``dcp.async_save`` (the blocking part is the call, the rest ends
  with the returned future); ``dcp.load`` + ``set_state_dict``.
* accelerate: ``Accelerator.save_state`` then an fsync of every file it
  wrote; ``Accelerator.load_state``.

No peer keeps a checksum, so every peer load is an unverified load.
Each save writes a fresh directory; removing the previous one is done outside
the clock (a save does not include freeing space; ckptmgr frees dropped steps
after ``save`` returns, too).
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Callable, Dict

import torch
from common import fsync_path

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")

PEER_SAVES = ("torch_save", "dcp_save", "accelerate_save")
PEER_LOADS = ("torch_load", "dcp_load", "accelerate_load")


def fsync_tree(root: str) -> None:
    """fsync every file under ``root`` and the directories holding them."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def _fresh(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


class Peers:
    """Save and load one model + optimizer with each peer, into ``scratch``.

    Args:
        model: The model (plain ``nn.Module`` on CPU).
        opt: Its optimizer, state populated.
        scratch: A directory for the peers' files.
        accelerate: Also set up accelerate (its import and Accelerator cost a few seconds).
    """

    def __init__(self, model: Any, opt: Any, scratch: str, accelerate: bool = True) -> None:
        self.model, self.opt, self.scratch = model, opt, scratch
        self.pth = os.path.join(scratch, "peer-torch.pth")
        self.dcp_dir = os.path.join(scratch, "peer-dcp")
        self.acc_dir = os.path.join(scratch, "peer-accelerate")
        self.acc: Any = None
        if accelerate:
            from accelerate import Accelerator
            self.acc = Accelerator(cpu=True)
            self.acc_model, self.acc_opt = self.acc.prepare(model, opt)  # same tensors; the optimizer is wrapped

    def drop(self, what: str) -> None:
        """Remove the files of the previous save of ``what`` (call outside the clock)."""
        _fresh({"torch": self.pth, "dcp": self.dcp_dir, "accelerate": self.acc_dir}[what])

    # ------------------------------------------------------------------ saves

    def torch_save(self) -> None:
        """torch.save of model and optimizer state dicts, then fsync."""
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, self.pth)
        fsync_path(self.pth)

    def _dcp_state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def dcp_save(self, path: str = "") -> None:
        """dcp.save (FileSystemWriter fsyncs what it writes)."""
        import torch.distributed.checkpoint as dcp
        dcp.save(self._dcp_state(), checkpoint_id=path or self.dcp_dir)

    def dcp_async_save(self, path: str = "") -> Any:
        """dcp.async_save; returns what must be waited for (``.result()``)."""
        import torch.distributed.checkpoint as dcp
        return dcp.async_save(self._dcp_state(), checkpoint_id=path or self.dcp_dir)

    def accelerate_save(self) -> None:
        """Accelerator.save_state, then fsync of every file it wrote."""
        self.acc.save_state(self.acc_dir)
        fsync_tree(self.acc_dir)

    # ------------------------------------------------------------------ loads (none verifies anything)

    def torch_load(self) -> None:
        """torch.load (weights_only) + load_state_dict on model and optimizer."""
        ckpt = torch.load(self.pth, weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])

    def dcp_load(self) -> None:
        """dcp.load into the live state dicts + set_state_dict."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=self.dcp_dir)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def accelerate_load(self) -> None:
        """Accelerator.load_state."""
        self.acc.load_state(self.acc_dir)

    def saves(self) -> Dict[str, Callable[[], None]]:
        """Name -> durable save, for the peers set up."""
        out = {"torch_save": self.torch_save, "dcp_save": self.dcp_save}
        if self.acc is not None:
            out["accelerate_save"] = self.accelerate_save
        return out

    def loads(self) -> Dict[str, Callable[[], None]]:
        """Name -> load into the live model and optimizer, for the peers set up."""
        out = {"torch_load": self.torch_load, "dcp_load": self.dcp_load}
        if self.acc is not None:
            out["accelerate_load"] = self.accelerate_load
        return out


def best(med: Dict[str, float], names: Any) -> tuple:
    """``(name, seconds)`` of the fastest of ``names`` present in ``med``."""
    present = [(med[n], n) for n in names if n in med]
    seconds, name = min(present)
    return name, seconds
