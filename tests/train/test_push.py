"""`--push-to-hub`: the policy folder goes up as a model repo, the optimizer-heavy checkpoints stay local.

The Hub client is replaced by a recorder here (the HTTP-level fake in tests/publish serves dataset
repos only); what is asserted is what refine-train asks the client to do.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from refinevla.train import push
from refinevla.train.errors import TrainError


class RecordingApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw: Any) -> Any:
        self.calls.append(("upload_folder", kw))
        return type("Info", (), {"oid": "abc123"})()


def test_push_uploads_the_policy_but_not_the_checkpoints(tmp_path, monkeypatch):
    api = RecordingApi()
    monkeypatch.setattr(push, "_hf_api", lambda token: api)
    monkeypatch.setattr(push, "resolve_token", lambda: "hf_test")
    (tmp_path / "checkpoints" / "step-000002" / "state").mkdir(parents=True)
    assert push.push_policy(tmp_path, "me/policy") == "abc123"
    (name, create), (name2, upload) = api.calls
    assert name == "create_repo" and create["repo_type"] == "model" and create["exist_ok"] is True
    assert name2 == "upload_folder" and upload["repo_id"] == "me/policy" and upload["folder_path"] == str(tmp_path)
    assert "checkpoints/*" in upload["ignore_patterns"] and upload["repo_type"] == "model"


def test_push_without_a_token_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(push, "resolve_token", lambda: None)
    with pytest.raises(TrainError, match="no Hub token"):
        push.push_policy(tmp_path, "me/policy")
