"""A tiny, exactly resumable Lightning run for the CheckpointIO tests; also the child process of the kill tests.

Exact resume needs the data order to survive a restart: Lightning saves no
position for a plain DataLoader, so the sampler's permutation is a pure
function of (seed, epoch) and the module stores how many batches of the
epoch were done (``on_save_checkpoint``) and skips them after a resume.

As a script (``python -m tests.integrations.lit_toy DIR --kill-at 12 --signal KILL``)
it trains with ``CkptmgrCheckpointIO`` into ``DIR/ckpts`` and signals itself
right after the given global step, as a scheduler or the OOM killer would
(or dies at a ckptmgr fault point armed through ``CKPTMGR_FAULT_POINT``).
"""
from __future__ import annotations

import argparse
import os
import signal
import warnings
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ckptmgr.integrations.lightning import CkptmgrCheckpointIO

BATCH = 8
SAMPLES = 64  # 8 batches per epoch

warnings.filterwarnings("ignore", module="lightning")


class ResumableSampler(Sampler):
    """A permutation per epoch from (seed, epoch); ``skip`` drops the first indices of the next epoch started."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


def make_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(SAMPLES, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=ResumableSampler(SAMPLES))


class Tiny(L.LightningModule):
    """AdamW with a per-step StepLR, plain hyperparameters (tuples included), a buffer."""

    def __init__(self, lr: float = 0.05, hidden: int = 8, betas: tuple = (0.9, 0.99), extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen += x.shape[0]
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        checkpoint["data_position"] = {"batches_done": done % self.trainer.num_training_batches}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sampler = getattr(self, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.skip = checkpoint["data_position"]["batches_done"] * BATCH


def weights(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_callback(dirpath: str, **kwargs: Any) -> ModelCheckpoint:
    """The issue's ModelCheckpoint: top-2 by step, a last.ckpt, every 5 training steps."""
    options = dict(save_top_k=2, monitor="step", mode="max", save_last=True, every_n_train_steps=5)
    options.update(kwargs)
    return ModelCheckpoint(dirpath=dirpath, **options)


def fit(dirpath: str, max_steps: int, *, plugin: Any = None, callbacks: Optional[List[Callback]] = None,
        ckpt_path: Optional[str] = None, model: Optional[Tiny] = None, **ckpt_kwargs: Any) -> L.Trainer:
    """Seed, build, fit; returns the trainer (``trainer.lightning_module`` is the model)."""
    L.seed_everything(0, workers=True, verbose=False)
    model = model if model is not None else Tiny()
    loader = make_loader()
    model.sampler = loader.sampler
    trainer = L.Trainer(max_steps=max_steps, plugins=[plugin if plugin is not None else CkptmgrCheckpointIO()],
                        callbacks=[checkpoint_callback(dirpath, **ckpt_kwargs), *(callbacks or [])], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        accelerator="cpu", devices=1)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


class SignalAt(Callback):
    """Send ``signum`` to this process right after global step ``step`` (a deterministic kill point)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--signal", choices=("TERM", "KILL"), default="KILL")
    args = parser.parse_args()
    callbacks = [SignalAt(args.kill_at, getattr(signal, f"SIG{args.signal}"))] if args.kill_at else []
    trainer = fit(os.path.join(args.dir, "ckpts"), args.max_steps, callbacks=callbacks, save_on_exception=True)
    print(f"finished at step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
