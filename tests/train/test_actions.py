"""OpenVLA's action tokenizer, pinned by hand-computed ids; statistics are `refine-data stats`' own."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from refinevla.train.actions import ActionTokenizer, load_statistics
from refinevla.train.errors import TrainError

ENTRY = {
    "action": {
        "q01": [0.0, -1.0, -0.5, 0.0, 0.0, 0.0, 0.0],
        "q99": [2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0],
        "min": [-1.0, -2.0, -1.0, 0.0, 0.0, 0.0, 0.0],
        "max": [3.0, 2.0, 1.0, 1.0, 1.0, 0.0, 1.0],
        "mask": [True] * 6 + [False],
    }
}


def test_ids_match_hand_computed_openvla_ids():
    tok = ActionTokenizer.from_statistics(ENTRY, vocab_size=512)
    # dim 0: q01 0, q99 2 -> 1.0 normalises to 0.0; digitize(0, linspace(-1, 1, 256)) = 128 -> 512 - 128
    # dim 1: -5 is clipped to -1 -> digitize = 1 -> 511;  dim 2: 0.7 > q99 is clipped to 1 -> digitize = 256 -> 256
    # dim 3: 0.25 -> -0.5 -> bins[63] = -0.50588 <= -0.5 < bins[64] -> 64 -> 448
    # dim 4: 2.0 > q99 -> 256; dim 5: min == max (unused) -> 0 -> 384;  dim 6 (gripper, not normalised): 1.0 -> 256
    ids = tok.encode(np.array([1.0, -5.0, 0.7, 0.25, 2.0, 0.0, 1.0]))
    assert ids.tolist() == [384, 511, 256, 448, 256, 384, 256]
    assert tok.encode(np.array([1.0, 0, 0, 0, 0, 0, 0.0]))[6] == 384  # closed gripper: 0 -> bin 128
    # exactly q99 is a hair under 1 (OpenVLA divides by q99 - q01 + 1e-8): bin 255, not 256
    assert tok.encode(np.array([0, 0, 0.5, 0, 0, 0, 0]))[2] == 257


def test_decoding_is_within_half_a_bin_and_ids_are_the_last_256():
    tok = ActionTokenizer.from_statistics(ENTRY, vocab_size=512)
    rng = np.random.default_rng(0)
    lo, hi = np.array(ENTRY["action"]["q01"]), np.array(ENTRY["action"]["q99"])
    a = rng.uniform(lo, hi, size=(2000, 7))
    a[:, 6] = rng.uniform(0, 1, 2000)
    ids = tok.encode(a)
    assert ids.min() >= 256 and ids.max() <= 511
    half_bin = (hi - lo) / 255 / 2  # a bin is 2/255 wide in normalised units
    half_bin[6] = 1 / 255
    err = np.abs(tok.decode(ids) - a)
    used = [0, 1, 2, 3, 4, 6]
    assert (err[:, used] <= half_bin[used] + 1e-9).all()
    assert np.allclose(tok.decode(ids)[:, 5], 0.0)  # an unused dimension decodes to its constant


def test_statistics_file_errors_are_one_line(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"a": ENTRY, "b": ENTRY}))
    with pytest.raises(TrainError, match="holds a, b"):
        load_statistics(p)
    assert load_statistics(p, "b")[0] == "b"
    p.write_text("{")
    with pytest.raises(TrainError, match="cannot read statistics"):
        load_statistics(p)
