import os
import random

import numpy as np
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


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what a crafted file does: unpickling calls a function of its choice
        return (open, (self.marker, "w"))


def test_checkpoints_load_without_running_code(tmp_path, monkeypatch):
    """torch.load(weights_only=True): a file whose pickle would call a function is refused
    (it used to run: weights_only=False), unless PYSSL_TRUSTED_CHECKPOINTS=1 says it is
    trusted; pyssl's own checkpoints (RNG states included) need nothing more."""
    marker = tmp_path / "code_ran"
    torch.save({"format": FORMAT, "x": _RunsCode(marker)}, tmp_path / "crafted.pt")
    monkeypatch.delenv(ckmod.TRUST_ENV, raising=False)
    with pytest.raises(ValueError, match="could run code when loaded; .*PYSSL_TRUSTED_CHECKPOINTS=1"):
        load_checkpoint(tmp_path / "crafted.pt")
    assert not marker.exists()
    monkeypatch.setenv(ckmod.TRUST_ENV, "1")
    load_checkpoint(tmp_path / "crafted.pt")
    assert marker.exists()
    monkeypatch.delenv(ckmod.TRUST_ENV)
    np.random.seed(1)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    atomic_save({"format": FORMAT, "rng": ckmod.rng_state()}, tmp_path / "last.pt")
    want = (np.random.rand(4), random.random(), torch.rand(3))
    ckmod.set_rng_state(load_checkpoint(tmp_path)["rng"])
    got = (np.random.rand(4), random.random(), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and want[1] == got[1] and torch.equal(want[2], got[2])


def test_older_checkpoints_with_numpy_rng_arrays_load_and_resume_the_rng(tmp_path, monkeypatch):
    """pyssl checkpoints written before weights_only=True held numpy's RNG state as it comes
    (a uint32 array): they load without trusting the file (numpy arrays are rebuilt without
    running code), while a file with any other object is still refused."""
    monkeypatch.delenv(ckmod.TRUST_ENV, raising=False)
    np.random.seed(3)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    torch.save({"format": FORMAT, "rng": state, "w": torch.ones(2)}, tmp_path / "old.pt")
    want = np.random.rand(4)
    ck = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(ck["rng"]["numpy"][1], np.ndarray)
    ckmod.set_rng_state(ck["rng"])
    assert np.array_equal(np.random.rand(4), want)
    torch.save({"format": FORMAT, "rng": state, "x": _RunsCode(tmp_path / "m")},
               tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="could run code"):
        load_checkpoint(tmp_path / "mixed.pt")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("value,trusted", [("0", False), ("false", False), ("No", False),
                                           ("off", False), ("", False), ("1", True),
                                           ("true", True), ("YES", True), ("2", True),
                                           ("maybe", None)])
def test_the_trust_variable_reads_as_a_boolean(tmp_path, monkeypatch, value, trusted):
    """PYSSL_TRUSTED_CHECKPOINTS=false used to count as trusted (anything but "" and "0")."""
    marker = tmp_path / "code_ran"
    torch.save({"format": FORMAT, "x": _RunsCode(marker)}, tmp_path / "crafted.pt")
    monkeypatch.setenv(ckmod.TRUST_ENV, value)
    if trusted is None:
        with pytest.raises(ValueError, match="PYSSL_TRUSTED_CHECKPOINTS='maybe': set it to 1"):
            load_checkpoint(tmp_path / "crafted.pt")
    elif trusted:
        load_checkpoint(tmp_path / "crafted.pt")
    else:
        with pytest.raises(ValueError, match="could run code"):
            load_checkpoint(tmp_path / "crafted.pt")
    assert marker.exists() == bool(trusted)
