"""Several models in one run (``model={name: module}``): GAN-shaped round trips, one file per model,
``load_checkpoint(..., model_name=)``, the hook, resume, sharded saves, and what ``inspect``/``ls`` show."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ckptmgr
from ckptmgr import CheckpointFormatError, CheckpointHook, CheckpointManager, cli
from tests.manager.helpers import assert_same

pytestmark = pytest.mark.timeout(120)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 12), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(12, 1))

    def forward(self, x):
        return self.net(x)


def gan(seed):
    """Two models, two optimizers, two schedulers: the shape of a GAN training run."""
    torch.manual_seed(seed)
    models = {"generator": Generator(), "discriminator": Discriminator()}
    opts = {"generator": torch.optim.Adam(models["generator"].parameters(), lr=2e-3, betas=(0.5, 0.999)),
            "discriminator": torch.optim.AdamW(models["discriminator"].parameters(), lr=1e-3)}
    scheds = {"generator": torch.optim.lr_scheduler.StepLR(opts["generator"], step_size=2, gamma=0.5),
              "discriminator": torch.optim.lr_scheduler.ExponentialLR(opts["discriminator"], gamma=0.9)}
    return models, opts, scheds


def train_gan(models, opts, scheds, steps):
    g, d = models["generator"], models["discriminator"]
    bce = nn.functional.binary_cross_entropy_with_logits
    for _ in range(steps):
        real, fake = torch.randn(8, 8), g(torch.randn(8, 4))
        loss_d = bce(d(real), torch.ones(8, 1)) + bce(d(fake.detach()), torch.zeros(8, 1))
        opts["discriminator"].zero_grad()
        loss_d.backward()
        opts["discriminator"].step()
        loss_g = bce(d(g(torch.randn(8, 4))), torch.ones(8, 1))
        opts["generator"].zero_grad()
        loss_g.backward()
        opts["generator"].step()
        for sched in scheds.values():
            sched.step()


def states(models, opts, scheds):
    return {"models": {n: m.state_dict() for n, m in models.items()},
            "opts": {n: o.state_dict() for n, o in opts.items()},
            "scheds": {n: s.state_dict() for n, s in scheds.items()}}


@pytest.fixture
def saved_gan(ckpt_dir):
    models, opts, scheds = gan(0)
    train_gan(models, opts, scheds, 3)
    with CheckpointManager(ckpt_dir) as mgr:
        path = mgr.save(3, model=models, optimizer=opts, scheduler=scheds, metrics={"loss": 0.5})
    return ckpt_dir, path, models, opts, scheds


def test_gan_round_trip_is_bit_exact_and_training_continues_identically(saved_gan):
    ckpt_dir, _, models, opts, scheds = saved_gan
    expected = states(models, opts, scheds)
    fresh = gan(1)
    with CheckpointManager(ckpt_dir) as mgr:
        restored = mgr.restore(model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    assert restored.step == 3
    assert_same(expected, states(*fresh))
    torch.manual_seed(5)
    train_gan(models, opts, scheds, 2)
    torch.manual_seed(5)
    train_gan(*fresh, 2)
    assert_same(states(models, opts, scheds), states(*fresh))


def test_each_model_is_its_own_safetensors_file_with_bare_keys_named_in_the_manifest(saved_gan):
    _, path, models, _, _ = saved_gan
    with open(os.path.join(path, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["components"]["models"] == {"generator": "model-generator.safetensors",
                                                "discriminator": "model-discriminator.safetensors"}
    assert "model" not in manifest["components"]
    for name, module in models.items():
        weights = load_file(os.path.join(path, f"model-{name}.safetensors"))
        assert_same(dict(module.state_dict()), weights)
    assert not os.path.exists(os.path.join(path, "model.safetensors"))


def test_one_model_still_writes_model_safetensors(ckpt_dir):
    model = Generator()
    with CheckpointManager(ckpt_dir) as mgr:
        path = mgr.save(1, model=model)
    with open(os.path.join(path, "manifest.json")) as fh:
        components = json.load(fh)["components"]
    assert components["model"] == "model.safetensors" and "models" not in components
    assert_same(dict(model.state_dict()), load_file(os.path.join(path, "model.safetensors")))


def test_restore_pairs_models_by_name_and_refuses_other_shapes(saved_gan):
    ckpt_dir, _, models, _, _ = saved_gan
    with CheckpointManager(ckpt_dir) as mgr:
        only_g = {"generator": Generator()}
        mgr.restore(model=only_g)                                  # a subset is fine (e.g. for sampling)
        assert_same(models["generator"].state_dict(), only_g["generator"].state_dict())
        with pytest.raises(CheckpointFormatError, match="saved as a dict of models"):
            mgr.restore(model=Generator())
        with pytest.raises(CheckpointFormatError, match=r"no model named \['ema'\]"):
            mgr.restore(model={"ema": Generator()})
        with pytest.raises(ValueError, match="file names"):
            mgr.save(4, model={"my model": Generator()})
        with pytest.raises(TypeError, match="dict of str -> nn.Module"):
            mgr.save(4, model={"generator": object()})


def test_load_checkpoint_picks_a_model_by_name(saved_gan, tmp_path):
    ckpt_dir, path, models, _, _ = saved_gan
    for source in (ckpt_dir, path):
        target = Discriminator()
        loaded = ckptmgr.load_checkpoint(target, source, strict=True, model_name="discriminator")
        assert_same(models["discriminator"].state_dict(), target.state_dict())
        assert loaded["models"] == ["discriminator", "generator"]
    with pytest.raises(CheckpointFormatError, match=r"several models: \['discriminator', 'generator'\]"):
        ckptmgr.load_checkpoint(Generator(), ckpt_dir)
    with pytest.raises(CheckpointFormatError, match=r"no model named 'ema'.*\['discriminator', 'generator'\]"):
        ckptmgr.load_checkpoint(Generator(), path, model_name="ema")
    single = str(tmp_path / "single")
    with CheckpointManager(single) as mgr:
        mgr.save(1, model={"ema": models["generator"]})
    target = Generator()
    ckptmgr.load_checkpoint(target, single, strict=True)                # one model in the dict: no name needed
    assert_same(models["generator"].state_dict(), target.state_dict())
    gan_file = str(tmp_path / "gan.pth")                                 # a plain file holding {name: state_dict}
    torch.save({n: m.state_dict() for n, m in models.items()}, gan_file)
    target = Generator()
    ckptmgr.load_checkpoint(target, gan_file, strict=True, model_name="generator")
    assert_same(models["generator"].state_dict(), target.state_dict())
    with pytest.raises(CheckpointFormatError, match="no model named 'ema'"):
        ckptmgr.load_checkpoint(target, gan_file, model_name="ema")


def test_hook_and_resume_from_latest_take_model_dicts(ckpt_dir):
    models, opts, scheds = gan(0)
    with CheckpointManager(ckpt_dir) as mgr:
        hook = CheckpointHook(mgr, model=models, optimizer=opts, scheduler=scheds, every_n_steps=2,
                              save_on_signals=None, rank_state=lambda: {"batches": 7})
        for step in range(hook.resume(), 4):
            train_gan(models, opts, scheds, 1)
            hook.after_step(step)
        hook.close()
        assert mgr.all_steps() == [1, 3]
    fresh = gan(1)
    with CheckpointManager(ckpt_dir) as mgr:
        hook = CheckpointHook(mgr, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], save_on_signals=None)
        assert hook.resume() == 4 and hook.restored.rank_state == {"batches": 7}
        hook.close()
    assert_same(states(models, opts, scheds), states(*fresh))
    again = gan(2)
    assert ckptmgr.resume_from_latest(ckpt_dir, model=again[0], optimizer=again[1], scheduler=again[2]) == 4
    assert_same(states(models, opts, scheds), states(*again))


def test_sharded_save_of_a_model_dict_round_trips_and_consolidates_per_model(ckpt_dir):
    models, opts, scheds = gan(0)
    train_gan(models, opts, scheds, 2)
    with CheckpointManager(ckpt_dir, sharded=True) as mgr:
        path = mgr.save(2, model=models, optimizer=opts, scheduler=scheds)
        fresh = gan(1)
        mgr.restore(model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    assert_same(states(models, opts, scheds), states(*fresh))
    target = Generator()
    ckptmgr.load_checkpoint(target, path, strict=True, model_name="generator")
    assert_same(models["generator"].state_dict(), target.state_dict())
    with pytest.raises(CheckpointFormatError, match="several models"):
        ckptmgr.load_checkpoint(target, path)


def test_inspect_and_ls_show_the_models(saved_gan, capsys):
    ckpt_dir, path, models, _, _ = saved_gan
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(4, model=models["generator"])                      # a single-model step beside it

    def run(*args):
        capsys.readouterr()
        assert cli.main([str(a) for a in args]) == 0
        return capsys.readouterr().out
    out = run("inspect", path)
    assert "models: discriminator, generator" in out
    assert "model 'generator': 9 tensors" in out and "model 'discriminator': 4 tensors" in out
    assert "net.0.weight" in out
    info = json.loads(run("inspect", path, "--json"))
    assert info["state_dict"] is None and set(info["models"]) == {"generator", "discriminator"}
    assert info["models"]["discriminator"]["tensors"] == len(models["discriminator"].state_dict())
    listing = json.loads(run("ls", ckpt_dir, "--json"))
    assert [c["models"] for c in listing["checkpoints"]] == [["discriminator", "generator"], ["model"]]
    text = run("ls", ckpt_dir)
    assert "MODELS" in text and "discriminator, generator" in text
