
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.zoo import load_model
from pipeline.zoo.nets import CifarResNet, SeedNet


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet18'; known: .*resnet20.*seednet"):
        load_model("resnet18")


def test_missing_checkpoint_says_what_was_looked_for(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model("seednet", tmp_path / "nope.pt")


def test_truncated_checkpoint_is_refused_readably(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(SeedNet().state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="could not be read"):
        load_model("seednet", path)


def test_checkpoint_carrying_code_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(InputError, match="refused.*would run code"):
        load_model("seednet", path)


def test_state_dict_of_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in CifarResNet(20).state_dict().items()}}, path)
    with pytest.raises(InputError, match=r"missing keys conv1.bias.*unexpected keys bn1\.bias"):
        load_model("seednet", path)


def test_resnet_without_weights_says_how_to_provide_them(monkeypatch):
    monkeypatch.delenv("CIFAR_RESNET_DIR", raising=False)
    with pytest.raises(InputError, match="WEIGHTS=path/to/resnet32"):
        load_model("resnet32")


def test_resnet_checkpoint_with_module_prefix_loads(resnet20_weights):
    spec = load_model("resnet20", resnet20_weights)
    assert spec.mean == (0.485, 0.456, 0.406)
    assert not spec.module.training


def test_user_model_by_import_spec(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(SeedNet().state_dict(), path)
    spec = load_model("pipeline.zoo.nets:SeedNet", path, mean=0.5, std=(0.5, 0.5, 0.5))
    assert spec.input_shape == (3, 32, 32) and spec.mean == (0.5, 0.5, 0.5) and spec.num_classes == 10
    assert spec.class_names is None  # the module names none: the data's names, or class0.., are used
    with pytest.raises(InputError, match=r"does not say its mean, std: .*MEAN=0.5 .*STD=0.25"):
        load_model("pipeline.zoo.nets:SeedNet", path)
    with pytest.raises(InputError, match=r"std has 2 values for 3 input channels"):
        load_model("pipeline.zoo.nets:SeedNet", path, mean=0.5, std=(0.5, 0.5))
    with pytest.raises(InputError, match=r"does not run on one input of shape \(1, 28, 28\)"):
        load_model("pipeline.zoo.nets:SeedNet", path, input_shape=(1, 28, 28), mean=0.5, std=0.5)
    with pytest.raises(InputError, match="could not be imported"):
        load_model("nosuch.module:Net", path)
    (tmp_path / "broken.py").write_text("def build(:\n")
    (tmp_path / "failing.py").write_text("def build():\n    raise ValueError('no config')\n")
    with pytest.raises(InputError, match="could not be imported \\(SyntaxError"):
        load_model(f"{tmp_path / 'broken.py'}:build", path)
    with pytest.raises(InputError, match="calling it raised ValueError: no config"):
        load_model(f"{tmp_path / 'failing.py'}:build", path)
