"""A toy mmengine Runner for the CkptmgrHook tests: a small regression model, a seeded sampler, a scripted metric."""
from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import METRICS
from mmengine.runner import Runner
from torch import nn

import ckptmgr.integrations.mmengine  # noqa: F401  (registers CkptmgrHook)


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, inputs, labels, mode="tensor"):
        out = self.net(inputs)
        if mode == "loss":
            return {"loss": nn.functional.mse_loss(out, labels)}
        if mode == "predict":
            return [dict(pred=o, label=t) for o, t in zip(out, labels)]
        return out


class ToyDataset(torch.utils.data.Dataset):
    METAINFO = dict(classes=("a", "b"), palette=[(0, 0, 0)])

    def __init__(self, n: int = 48) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=gen)
        self.metainfo = self.METAINFO

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return dict(inputs=self.x[i], labels=self.y[i])


@METRICS.register_module(force=True)
class ScriptedScore(BaseMetric):
    """Reports ``score`` from a fixed list, one value per evaluation (the best is where the test wants it)."""

    scores: List[float] = []

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        self.results.append(len(data_samples))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        return {"score": ScriptedScore.scores.pop(0)}


class Crash(Hook):
    """Raise right after the given epoch or iteration (1-based), as a crash or preemption would stop the run."""

    priority = "LOWEST"

    def __init__(self, epoch: int = 0, iteration: int = 0) -> None:
        self.epoch, self.iteration = epoch, iteration

    def after_train_epoch(self, runner) -> None:
        if self.epoch and runner.epoch + 1 == self.epoch:
            raise RuntimeError(f"simulated crash after epoch {self.epoch}")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.iteration and runner.iter + 1 == self.iteration:
            raise RuntimeError(f"simulated crash after iteration {self.iteration}")


class RngProbe(Hook):
    """Record torch's RNG state when each training epoch starts (before its data loader draws a seed)."""

    def __init__(self) -> None:
        self.states: Dict[int, torch.Tensor] = {}

    def before_train_epoch(self, runner) -> None:
        self.states[runner.epoch] = torch.get_rng_state()


def make_runner(work_dir: str, hook: Optional[dict] = None, *, by_epoch: bool = True, max_epochs: int = 4,
                max_iters: int = 20, crash: Optional[Hook] = None, resume: bool = False,
                load_from: Optional[str] = None, validate: bool = False, custom_hooks: Optional[list] = None
                ) -> Runner:
    train_cfg = dict(by_epoch=True, max_epochs=max_epochs) if by_epoch else dict(by_epoch=False, max_iters=max_iters)
    milestones = [1, 3] if by_epoch else [7, 15]
    extra: Dict[str, Any] = {}
    if validate:
        train_cfg["val_interval"] = 1
        extra = dict(val_dataloader=dict(dataset=ToyDataset(8), batch_size=8,
                                         sampler=dict(type="DefaultSampler", shuffle=False),
                                         collate_fn=dict(type="default_collate")),
                     val_cfg=dict(), val_evaluator=dict(type="ScriptedScore"))
    torch.manual_seed(0)  # the model is built before the Runner seeds: seed its initial weights here
    return Runner(
        model=ToyModel(), work_dir=work_dir, experiment_name=f"toy-{uuid.uuid4().hex[:8]}",
        train_dataloader=dict(dataset=ToyDataset(), batch_size=8, sampler=dict(type="DefaultSampler", shuffle=True),
                              collate_fn=dict(type="default_collate")),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        param_scheduler=dict(type="MultiStepLR", milestones=milestones, gamma=0.5, by_epoch=by_epoch),
        train_cfg=train_cfg,
        default_hooks=dict(checkpoint=hook, logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[*(custom_hooks or []), *([crash] if crash is not None else [])],
        randomness=dict(seed=0, deterministic=True), resume=resume, load_from=load_from,
        default_scope="mmengine", log_level="WARNING", **extra)


def ckpt_hook(runner: Runner) -> Any:
    from ckptmgr.integrations.mmengine import CkptmgrHook
    return next(h for h in runner.hooks if isinstance(h, CkptmgrHook))


def train_until_crash(runner: Runner) -> None:
    """Train; the Crash hook stops it. The process lives on, so release the hook's directory as a dying one would."""
    try:
        runner.train()
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    else:
        raise AssertionError("the run was meant to crash")
    finally:
        ckpt_hook(runner).close()


def weights(runner: Runner) -> Dict[str, torch.Tensor]:
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
