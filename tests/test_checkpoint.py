"""load_checkpoint on real torch.save files: success paths and every refusal."""

from collections import OrderedDict

import pytest
import torch
import yaml

from edgeseg.host.archs import NestedUNet, UNet
from edgeseg.host.checkpoint import LoadedModel, load_checkpoint
from edgeseg.host.errors import CheckpointError, EdgesegError


def _model(cls, **kwargs):
    torch.manual_seed(0)
    model = cls(**kwargs)
    with torch.no_grad():  # make BN statistics non-default so a lost buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    return model.eval()


@pytest.fixture(scope="module")
def nested():
    return _model(NestedUNet, num_classes=2, input_channels=3)


@pytest.fixture(scope="module")
def nested_ds():
    return _model(NestedUNet, num_classes=3, input_channels=1, deep_supervision=True)


@pytest.fixture(scope="module")
def unet():
    return _model(UNet, num_classes=1, input_channels=3)


def _save(obj, folder, config=None, name="model.pth"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(folder / name))
    if config is not None:
        (folder / "config.yml").write_text(yaml.safe_dump(config))
    return folder / name


def _same_output(a, b, channels=3):
    x = torch.randn(1, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if isinstance(ya, list):
        return all(torch.equal(p, q) for p, q in zip(ya, yb))
    return torch.equal(ya, yb)


NESTED_CONFIG = {"arch": "NestedUNet", "num_classes": 2, "input_channels": 3,
                 "deep_supervision": False, "input_h": 96, "input_w": 96, "epochs": 100}


def test_plain_state_dict_with_config_yml(tmp_path, nested):
    path = _save(nested.state_dict(), tmp_path / "m", NESTED_CONFIG)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.arch == "nested_unet"
    assert loaded.config == {"arch": "nested_unet", "num_classes": 2, "input_channels": 3,
                             "deep_supervision": False, "input_h": 96, "input_w": 96}
    assert loaded.report["config_file"] == str(tmp_path / "m" / "config.yml")
    assert loaded.report["weights_key"] is None
    assert loaded.report["prefix_stripped"] is None
    assert loaded.report["inferred"] == []
    assert loaded.report["matched_keys"] == len(nested.state_dict())
    assert not loaded.model.training
    assert _same_output(loaded.model, nested)


def test_infers_everything_without_config(tmp_path, nested_ds):
    path = _save(nested_ds.state_dict(), tmp_path)
    loaded = load_checkpoint(path)
    assert loaded.config == {"arch": "nested_unet", "num_classes": 3, "input_channels": 1,
                             "deep_supervision": True}
    text = " ".join(loaded.report["inferred"])
    assert "num_classes=3 (from final4.weight" in text
    assert "input_channels=1 (from conv0_0.conv1.weight" in text
    assert "deep_supervision=True" in text and "arch=nested_unet" in text
    assert loaded.report["config_file"] is None
    assert _same_output(loaded.model, nested_ds, channels=1)


def test_infers_unet(tmp_path, unet):
    loaded = load_checkpoint(_save(unet.state_dict(), tmp_path))
    assert loaded.arch == "unet"
    assert isinstance(loaded.model, UNet)
    assert "arch=unet (no conv0_1.* keys)" in loaded.report["inferred"]
    assert _same_output(loaded.model, unet)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net", "weights"])
def test_wrapped_training_checkpoint(tmp_path, unet, key):
    path = _save({"epoch": 7, "best_iou": 0.5, key: unet.state_dict()}, tmp_path)
    loaded = load_checkpoint(path)
    assert loaded.report["weights_key"] == key
    assert _same_output(loaded.model, unet)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_strips_dataparallel_and_compile_prefixes(tmp_path, unet, prefix):
    state = OrderedDict((prefix + k, v) for k, v in unet.state_dict().items())
    loaded = load_checkpoint(_save(state, tmp_path))
    assert loaded.report["prefix_stripped"] == prefix
    assert _same_output(loaded.model, unet)


def test_explicit_arguments_override_config_yml(tmp_path, nested):
    path = _save(nested.state_dict(), tmp_path, dict(NESTED_CONFIG, num_classes=5))
    with pytest.raises(CheckpointError, match="shape-mismatched 2"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, num_classes=2)
    assert loaded.config["num_classes"] == 2 and loaded.config["input_h"] == 96


def test_shape_mismatch_lists_keys(tmp_path, nested):
    path = _save(nested.state_dict(), tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, num_classes=4)
    text = str(info.value)
    assert "shape-mismatched 2 (final.bias, final.weight)" in text
    assert "missing 0" in text and "unexpected 0" in text
    assert "matched {}".format(len(nested.state_dict()) - 2) in text
    assert info.value.hint


def test_wrong_arch_lists_missing_and_unexpected(tmp_path, unet, nested):
    path = _save(unet.state_dict(), tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch="NestedUNet")
    text = str(info.value)
    assert "missing " in text and "conv0_1.bn1.bias" in text
    assert "does not fit nested_unet" in text
    with pytest.raises(CheckpointError, match="unexpected [1-9]"):
        load_checkpoint(_save(nested.state_dict(), tmp_path / "n"), arch="unet")


def test_whole_pickled_model_is_refused_naming_global(tmp_path, unet):
    path = _save(unet, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "edgeseg.host.archs.UNet" in str(info.value)
    assert "whole pickled model" in str(info.value)
    assert "state_dict()" in info.value.hint


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_directory_instead_of_file(tmp_path, unet):
    _save(unet.state_dict(), tmp_path)
    with pytest.raises(CheckpointError, match="is a folder") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path / "model.pth") in info.value.hint


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, unet, legacy):
    path = tmp_path / "model.pth"
    torch.save(unet.state_dict(), str(path), _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated") as info:
        load_checkpoint(path)
    assert "Copy the file again" in info.value.hint


def test_text_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(path)


def test_empty_dict(tmp_path):
    with pytest.raises(CheckpointError, match="empty dict"):
        load_checkpoint(_save({}, tmp_path))


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(_save([torch.zeros(2)], tmp_path))
    with pytest.raises(CheckpointError, match="top-level keys: 'epoch', 'optimizer'"):
        load_checkpoint(_save({"epoch": 1, "optimizer": {}}, tmp_path / "b"))


def test_foreign_weights_cannot_be_inferred(tmp_path):
    path = _save(torch.nn.Linear(3, 2).state_dict(), tmp_path)
    with pytest.raises(CheckpointError, match="Cannot infer .*first keys: weight, bias") as info:
        load_checkpoint(path)
    assert "config.yml" in info.value.hint


def test_unknown_arch_in_config(tmp_path, unet):
    path = _save(unet.state_dict(), tmp_path, {"arch": "DeepLabV3", "num_classes": 1})
    with pytest.raises(CheckpointError, match="'DeepLabV3' is not built into edgeseg"):
        load_checkpoint(path)


def test_bad_config_yml(tmp_path, unet):
    path = _save(unet.state_dict(), tmp_path)
    (tmp_path / "config.yml").write_text("arch: [unclosed\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_checkpoint(path)
    (tmp_path / "config.yml").write_text("- just\n- a list\n")
    with pytest.raises(CheckpointError, match="not a mapping"):
        load_checkpoint(path)


def test_errors_are_edgeseg_errors():
    assert issubclass(CheckpointError, EdgesegError)
