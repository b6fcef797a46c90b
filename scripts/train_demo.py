"""A small single-process demo: train, save a checkpoint atomically, load it into a fresh model.

The torchrun preemption demo replaces this once training-loop integration lands.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ckptmgr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="directory for the checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    for step in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = os.path.join(args.out, "model.safetensors")
    ckptmgr.save_checkpoint(model, path, optimizer=opt, meta={"step": 50, "loss": loss.item()})
    print(f"trained 50 steps, loss {loss.item():.4f}; saved {path} ({os.path.getsize(path)} bytes)")
    fresh = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    ckpt = ckptmgr.load_checkpoint(fresh, path, strict=True)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    print(f"loaded into a fresh model: step {ckpt['meta']['step']}, weights identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
