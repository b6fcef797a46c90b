"""The plugin also serves the standalone ``pytorch_lightning`` package (its own CheckpointIO base class)."""
from __future__ import annotations

import os

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ckptmgr.integrations.lightning import CkptmgrCheckpointIO, load_checkpoint_dict  # noqa: E402


class Small(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(directory, steps, ckpt_path=None):
    trainer = pl.Trainer(max_steps=steps, plugins=[CkptmgrCheckpointIO()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True,
                                                                 every_n_train_steps=3)])
    torch.manual_seed(0)
    trainer.fit(Small(), DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_pytorch_lightning_trainer_saves_and_resumes(tmp_path):
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    assert isinstance(CkptmgrCheckpointIO(), CheckpointIO)
    _fit(str(tmp_path), 6)
    assert load_checkpoint_dict(os.path.join(tmp_path, "last.ckpt"))["global_step"] == 6
    assert _fit(str(tmp_path), 8, ckpt_path="last").global_step == 8
