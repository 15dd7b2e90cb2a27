"""`--push-to-hub`: the policy folder goes up as a model repo, the optimizer-heavy checkpoints stay local.

Against the fake Hub of the publish tests (a real HTTP server on 127.0.0.1, spoken to by the real
`huggingface_hub` client), which serves model repos as well as dataset repos.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from refinevla.train import push
from refinevla.train.errors import TrainError
from tests.publish.conftest import fake_hub  # noqa: F401  (the HTTP fake Hub of the publish tests)


def test_push_uploads_the_policy_but_not_the_checkpoints_over_http(tmp_path, fake_hub, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
    out = tmp_path / "ckpt"
    (out / "checkpoints" / "step-000002" / "state").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "state" / "optimizer.bin").write_bytes(b"\x00" * 4096)
    weights = bytes(range(256)) * 64  # binary: goes up through LFS
    (out / "model.safetensors").write_bytes(weights)
    (out / "config.json").write_text('{"model_type": "paligemma"}')
    (out / "refinevla_policy.json").write_text('{"model_family": "paligemma"}')
    oid = push.push_policy(out, "me/policy")
    files = fake_hub.repos["me/policy"]["branches"]["main"]
    assert {"model.safetensors", "config.json", "refinevla_policy.json"} <= set(files)
    assert not any(f.startswith("checkpoints/") for f in files), "optimizer state stays local"
    assert files["model.safetensors"] == weights and oid
    creates = fake_hub.calls("POST", "/api/repos/create")
    assert creates and creates[0].json().get("type", "model") == "model"
    assert all(r.headers.get("authorization") == "Bearer hf_test_secret" for r in creates)
    # A second push of the same folder: the repo exists (409 read as exist_ok), a new commit lands.
    push.push_policy(out, "me/policy")
    assert len([c for c in fake_hub.commits if c["repo"] == "me/policy"]) == 2


def test_push_without_a_token_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(push, "resolve_token", lambda: None)
    with pytest.raises(TrainError, match="no Hub token"):
        push.push_policy(tmp_path, "me/policy")
