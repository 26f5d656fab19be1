import os

import pytest
import torch

from pyssl.engine import checkpoint as ckmod
from pyssl.engine.checkpoint import FORMAT, atomic_save, load_checkpoint


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": FORMAT, "step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PARTIAL" * 100)     # half a file on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": FORMAT, "step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(ckmod.torch, "save", real_save)
    ck = load_checkpoint(path)                      # the previous complete checkpoint
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]   # no temporary left behind
    atomic_save({"format": FORMAT, "step": 3}, path)
    assert load_checkpoint(tmp_path)["step"] == 3        # a run folder works too


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a pyssl checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "garbage.pt")
