"""The networks: airbench (whitening, parameter groups, flip TTA) and the CIFAR ResNet-18, built from
MODELS, trained by the loop and restored from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from dataopt.registry import MODELS
from dataopt.train import loop
from dataopt.train.checkpoint import load_model, save_model
from dataopt.train.nets import AirbenchNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("name,kwargs,dim", [("airbench", {"width": 8}, 32), ("resnet18", {"width": 8}, 64),
                                             ("small_cnn", {"width": 8}, 32)])
def test_models_take_small_and_cifar_images(name, kwargs, dim, size):
    if name != "resnet18":
        kwargs = {**kwargs, "image_size": size}
    model = MODELS.build(name, kwargs, n_classes=10).eval()
    x = torch.randn(3, 3, size, size)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, dim) and model.feature_dim == dim


def test_airbench_prepare_whitens_two_by_two_patches():
    torch.manual_seed(0)
    mix = torch.randn(12, 12)  # correlated patch pixels
    net = AirbenchNet(10, width=8)
    x = (torch.randn(2000, 12) @ mix).view(2000, 3, 2, 2).repeat(1, 1, 4, 4)[:, :, :8, :8]
    net.prepare(x)
    half = net.whiten_width // 2
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
    w = net.whiten.weight[:half].reshape(half, 12).double()
    z = patches @ w.T
    cov = z.T @ z / len(z)
    assert torch.allclose(cov, torch.eye(half, dtype=torch.float64), atol=0.02)
    assert torch.equal(net.whiten.weight[half:], -net.whiten.weight[:half])
    assert not net.whiten.weight.requires_grad


def test_airbench_param_groups_cover_every_trainable_parameter_once():
    net = AirbenchNet(10, width=8)
    biases, rest = net.param_groups(lr=0.1, weight_decay=5e-4)
    ids = [id(p) for g in (biases, rest) for p in g["params"]]
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(5e-4 / 64)
    assert rest["lr"] == 0.1 and all(p.dim() > 1 for p in rest["params"])


def test_airbench_flip_tta_only_in_eval_and_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    plain = AirbenchNet(10, width=8, image_size=16).eval()
    tta = AirbenchNet(10, width=8, image_size=16, flip_tta=True)
    tta.load_state_dict(plain.state_dict())
    tta.eval()
    with torch.no_grad():
        assert not torch.allclose(tta(x), plain(x))
        mirror = 0.5 * (plain(x) + plain(x.flip(-1)))
        assert torch.allclose(tta(x), mirror, atol=1.0) and not torch.allclose(tta(x), mirror, atol=1e-6)
        tta.train()
        plain.train()
        assert torch.allclose(tta(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("name", ["airbench", "resnet18"])
def test_trains_on_a_toy_task_and_round_trips_a_checkpoint(name, tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randint(0, 60, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 1, 0] += 150  # class 1 is red
    kwargs = {"width": 8, "image_size": 8, "flip_tta": True} if name == "airbench" else {"width": 8}
    with loop.seeded(0):
        model = MODELS.build(name, kwargs, n_classes=2)
    loop.fit(model, x, y, loop.FitConfig(epochs=6, batch_size=16, lr=0.05, progress=False,
                                         augment="flip_crop", lookahead=name == "airbench"))
    logits = loop.predict_logits(model, x)
    assert float((logits.argmax(1) == y).float().mean()) >= 0.9
    save_model(tmp_path / "m", model, {"model": name, "kwargs": {"n_classes": 2, **kwargs}})
    restored, _ = load_model(tmp_path / "m")
    assert torch.equal(loop.predict_logits(restored, x), logits)
