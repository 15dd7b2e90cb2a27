"""The embedded sample is real simulated robot data in Bridge's layout, readable offline.

`scripts/make_sample.py` generates it with ManiSkill3's motion planner; these tests pin what
that script promises (see its docstring), so a regenerated or hand-edited sample that breaks
the conventions every later stage relies on fails here rather than in a demo.
"""

from __future__ import annotations

import os
import socket
from importlib import resources
from typing import Any

import numpy as np
import pytest

from refinevla.annotate.episode import Episode
from refinevla.annotate.sources import open_source

MAX_BYTES = 12 * 1024 * 1024
PICK_TASKS = ("PickCube", "StackCube")  # tasks whose episodes grasp an object
ALL_TASKS = ("PickCube", "StackCube", "PushCube", "PullCube")


@pytest.fixture(scope="module")
def episodes() -> list[Episode]:
    """Read once: every test below looks at the whole sample."""
    return list(open_source("sample").iter_episodes())


def _task(ep: Episode) -> str:
    """The ManiSkill task name from `maniskill3/<Task>-v1/seed_<n>`."""
    return str(ep.metadata["file_path"]).split("/")[1].split("-")[0]


def test_opens_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample is package data: reading it must not touch the network."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access attempted while reading the embedded sample")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    eps = list(open_source("sample").iter_episodes())
    assert 10 <= len(eps) <= 16


def test_episode_layout(episodes: list[Episode]) -> None:
    """Bridge's per-step flags, rewards and episode metadata, one camera `image_0`."""
    assert 10 <= len(episodes) <= 16
    assert len({ep.episode_id for ep in episodes}) == len(episodes)
    for ep in episodes:
        n = len(ep)
        assert n >= 20, ep.episode_id
        assert ep.instruction.strip(), ep.episode_id
        assert ep.cameras == ["image_0"]
        assert ep.states.shape == (n, 7) and ep.actions.shape == (n, 7)
        assert ep.states.dtype == np.float32 and ep.actions.dtype == np.float32
        assert ep.is_first.tolist() == [True] + [False] * (n - 1)
        assert ep.is_last.tolist() == [False] * (n - 1) + [True]
        assert ep.is_terminal.tolist() == ep.is_last.tolist()
        # Only successful episodes are kept: reward 1 on the last step, 0 before.
        assert ep.rewards.tolist() == [0.0] * (n - 1) + [1.0]
        assert str(ep.metadata["file_path"]).startswith("maniskill3/")


def test_several_tasks(episodes: list[Episode]) -> None:
    """At least three different ManiSkill tasks, so the sample is not one motion repeated."""
    tasks = {_task(ep) for ep in episodes}
    assert tasks <= set(ALL_TASKS)
    assert len(tasks) >= 3


def test_frames_are_real_images(episodes: list[Episode]) -> None:
    """Every frame decodes to 256x256 RGB and shows something (not a constant/black render)."""
    for ep in episodes:
        frames = ep.frames["image_0"]
        assert len(frames) == len(ep)
        for i in range(len(frames)):
            img = frames[i]
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8
            assert img.std() > 10.0, (ep.episode_id, i)
            assert img.mean() > 30.0, (ep.episode_id, i)  # not a black render
        # The scene changes over the episode (the robot moves in view).
        first, last = frames[0].astype(np.float32), frames[len(frames) - 1].astype(np.float32)
        assert np.abs(first - last).mean() > 1.0, ep.episode_id


def test_robot_moves(episodes: list[Episode]) -> None:
    """The end effector travels: xyz spans several centimetres in every episode."""
    for ep in episodes:
        xyz = ep.states[:, :3]
        assert np.all(np.isfinite(ep.states)) and np.all(np.isfinite(ep.actions))
        assert float(np.ptp(xyz, axis=0).max()) > 0.05, ep.episode_id
        path = float(np.linalg.norm(np.diff(xyz, axis=0), axis=1).sum())
        assert path > 0.1, ep.episode_id


def test_gripper(episodes: list[Episode]) -> None:
    """State gripper is the opening in [0, 1] (1 open); action gripper the 0/1 command.

    Grasping episodes start open and close on the cube (about 0.5 for a 4 cm cube);
    push/pull episodes close the gripper fully first and push with the closed fingers.
    """
    for ep in episodes:
        g = ep.states[:, 6]
        assert np.all((g >= 0.0) & (g <= 1.0)), ep.episode_id
        assert set(np.unique(ep.actions[:, 6]).tolist()) <= {0.0, 1.0}, ep.episode_id
        assert g[0] > 0.9, ep.episode_id  # every episode starts with the gripper open
        if _task(ep) in PICK_TASKS:
            assert g.min() < 0.6, ep.episode_id
            assert set(np.unique(ep.actions[:, 6]).tolist()) == {0.0, 1.0}, ep.episode_id
        else:
            assert g.min() < 0.05, ep.episode_id
            assert ep.actions[0, 6] == 0.0, ep.episode_id  # the first command closes


def test_gripper_command_leads_state(episodes: list[Episode]) -> None:
    """The first close command is followed by the opening shrinking (commands drive the state)."""
    for ep in episodes:
        cmd, g = ep.actions[:, 6], ep.states[:, 6]
        t = int(np.flatnonzero(cmd == 0.0)[0])  # every task closes the gripper at some point
        assert g[t + 1 : t + 6].min() < g[t] - 0.1, (ep.episode_id, t)


def test_actions_are_state_deltas(episodes: list[Episode]) -> None:
    """action[t, :6] = state[t+1, :6] - state[t, :6]; zero movement on the last step."""
    for ep in episodes:
        np.testing.assert_allclose(
            ep.actions[:-1, :6], np.diff(ep.states[:, :6], axis=0), atol=1e-5, err_msg=ep.episode_id
        )
        np.testing.assert_array_equal(ep.actions[-1, :6], np.zeros(6, np.float32))
        # Euler angles are unwrapped, so no +-2*pi jumps appear as rotations.
        assert np.abs(ep.actions[:, 3:6]).max() < 0.5, ep.episode_id


def test_package_size() -> None:
    """The sample ships inside the wheel: keep it small."""
    root = os.fspath(resources.files("refinevla.annotate.sources") / "sample")  # type: ignore[call-overload]
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
    assert 0 < total <= MAX_BYTES, total
