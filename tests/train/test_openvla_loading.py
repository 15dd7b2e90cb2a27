"""OpenVLA's loading path, offline: remote code named by `auto_map.AutoModelForVision2Seq`.

transformers 5 removed `AutoModelForVision2Seq`, under which OpenVLA registers its class, so the
adapter resolves the class from the checkpoint's own `auto_map`. A local folder with a tiny
remote-code model in OpenVLA's layout stands in for `openvla/openvla-7b` (nothing from the Hub).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from refinevla.train.adapters.openvla import OpenVLAAdapter  # noqa: E402
from refinevla.train.errors import TrainError  # noqa: E402

CONFIG = """
from transformers import PretrainedConfig


class TinyVLAConfig(PretrainedConfig):
    model_type = "openvla"

    def __init__(self, hidden=8, **kw):
        self.hidden = hidden
        super().__init__(**kw)
"""

MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyVLAConfig


class TinyVLA(PreTrainedModel):
    config_class = TinyVLAConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden, config.hidden)
        self.post_init()
"""


def _remote_code_folder(d: Path) -> Path:
    d.mkdir()
    (d / "configuration_tiny.py").write_text(CONFIG)
    (d / "modeling_tiny.py").write_text(MODEL.replace("from .configuration_tiny", "from configuration_tiny"))
    sys.path.insert(0, str(d))
    try:
        import configuration_tiny  # type: ignore[import-not-found]
        import modeling_tiny  # type: ignore[import-not-found]

        model = modeling_tiny.TinyVLA(configuration_tiny.TinyVLAConfig(hidden=8))
        model.save_pretrained(d)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("configuration_tiny", None)
        sys.modules.pop("modeling_tiny", None)
    (d / "modeling_tiny.py").write_text(MODEL)  # as on the Hub: a relative import of its config
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyVLAConfig",
        "AutoModelForVision2Seq": "modeling_tiny.TinyVLA",
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_the_class_comes_from_the_checkpoints_auto_map_with_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    d = _remote_code_folder(tmp_path / "ckpt")
    from safetensors.torch import load_file

    expected = load_file(str(d / "model.safetensors"))
    model = OpenVLAAdapter().load_model(str(d), torch.float32)
    assert type(model).__name__ == "TinyVLA"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_folder_without_the_auto_map_entry_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    d = _remote_code_folder(tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    del config["auto_map"]["AutoModelForVision2Seq"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match=r"auto_map\.AutoModelForVision2Seq"):
        OpenVLAAdapter().load_model(str(d), torch.float32)
