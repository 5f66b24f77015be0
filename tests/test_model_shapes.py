"""Models beyond the demo: several classes (sigmoid or softmax), grey input, deep supervision.

Each is a checkpoint as pytorch-nested-unet writes it (model.pth + config.yml), exported by
``convert``, validated against PyTorch, and run by the agent on real nuclei crops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgeseg.device.agent import run_agent
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.convert import convert

from models_util import nuclei_folder, nuclei_frames, random_net, write_checkpoint

SIZE = 32


def quiet(message):
    pass


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    return nuclei_folder(tmp_path_factory.mktemp("val"), 3, 48, seed=2)


def _agent(model_path, source, tmp_path):
    masks = tmp_path / "masks"
    report = run_agent(model=str(model_path), source=str(source), frames=3, warmup=1,
                       save_masks=str(masks), log=quiet)
    assert report["frames"] == 3 and report["masks_saved"] == 3
    return [np.asarray(Image.open(p)) for p in sorted(masks.glob("*.png"))]


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_three_classes_with_either_activation(tmp_path, val_dir, activation):
    model = random_net("nested_unet", seed=21, num_classes=3)
    ckpt = write_checkpoint(tmp_path / "ckpt", model, size=SIZE, num_classes=3)
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                     val=str(val_dir), activation=activation, log=quiet)
    assert report["ok"], report["artifacts"][0]["failures"]
    (art,) = report["artifacts"]
    assert art["outputs"] == [{"name": "logits", "shape": ["batch", 3, SIZE, SIZE]}]
    contract = Runner(art["path"], providers=["cpu"]).contract
    assert contract.activation == activation and contract.num_classes == 3
    assert contract.class_names == ["class0", "class1", "class2"]
    assert report["contract"]["activation"] == activation
    labels = _agent(art["path"], val_dir, tmp_path)
    assert labels[0].shape == (48, 48) and labels[0].max() <= 3
    if activation == "softmax":  # one class per pixel: every pixel is labelled 1..3
        assert all(label.min() >= 1 for label in labels)


def test_single_channel_model_takes_grey_frames(tmp_path, val_dir):
    model = random_net("unet", seed=22, channels=1)
    ckpt = write_checkpoint(tmp_path / "ckpt", model, arch="UNet", size=SIZE, channels=1)
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                     val=str(val_dir), log=quiet)
    assert report["ok"], report["artifacts"][0]["failures"]
    (art,) = report["artifacts"]
    assert art["inputs"] == [{"name": "input", "shape": ["batch", 1, SIZE, SIZE]}]
    runner = Runner(art["path"], providers=["cpu"])
    assert runner.contract.color_order == "GRAY" and runner.contract.channels == 1
    frame = nuclei_frames(1, SIZE)[0].image
    batch = preprocess(frame, runner.contract)
    assert batch.shape == (1, 1, SIZE, SIZE)
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(runner.run(batch), want, atol=1e-4)
    assert len(_agent(art["path"], val_dir, tmp_path)) == 3


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    model = random_net("nested_unet", seed=23, num_classes=2, deep_supervision=True)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ds"), model, size=SIZE, num_classes=2,
                            deep_supervision=True)
    return model, ckpt


def test_deep_supervision_exports_the_final_head_by_default(tmp_path, deep, val_dir):
    model, ckpt = deep
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                     val=str(val_dir), log=quiet)
    assert report["ok"]
    (art,) = report["artifacts"]
    assert [o["name"] for o in art["outputs"]] == ["logits"]
    assert report["export"]["heads"] == {"model_outputs": 4, "exported": ["logits"]}
    assert any("3 auxiliary head(s) dropped" in f for f in report["fixes"])
    runner = Runner(art["path"], providers=["cpu"])
    batch = preprocess(nuclei_frames(1, SIZE)[0].image, runner.contract)
    with torch.no_grad():
        heads = [h.numpy() for h in model(torch.from_numpy(batch))]
    np.testing.assert_allclose(runner.run(batch), heads[-1], atol=1e-4)
    assert not np.allclose(heads[-1], heads[0], atol=1e-2)  # the head choice matters


def test_all_heads_exports_every_head_under_clear_names(tmp_path, deep, val_dir):
    model, ckpt = deep
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                     val=str(val_dir), all_heads=True, log=quiet)
    assert report["ok"]
    (art,) = report["artifacts"]
    names = ["logits", "logits_head1", "logits_head2", "logits_head3"]
    assert [o["name"] for o in art["outputs"]] == names
    assert not any("dropped" in f for f in report["fixes"])
    runner = Runner(art["path"], providers=["cpu"])
    batch = preprocess(nuclei_frames(1, SIZE, seed=4)[0].image, runner.contract)
    outputs = runner.run_all(batch)
    with torch.no_grad():
        heads = [h.numpy() for h in model(torch.from_numpy(batch))]
    for name, want in zip(names, [heads[3], heads[0], heads[1], heads[2]]):
        np.testing.assert_allclose(outputs[name], want, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(runner.run(batch), heads[-1], atol=1e-4)  # the agent's logits
    assert len(_agent(art["path"], val_dir, tmp_path)) == 3
