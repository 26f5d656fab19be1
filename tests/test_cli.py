"""The command line: recipes list, pretrain/eval round trip, bad input before training."""

import json
import re

import pytest
import torch

from pyssl.cli import main

TINY = ["progress=false", "tensorboard=false", "data_subset=64", "batch_size=32",
        "image_size=16", "backbone_width=4", "max_steps=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_recipes_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("rotnet", "relative_patch", "jigsaw", "inpainting", "colorization"):
        assert name in out
    assert main(["recipes", "-v"]) == 0
    assert "Gidaris" in capsys.readouterr().out


def test_pretrain_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "jigsaw", "--data", "digits", "--epochs", "1", "--out", str(out),
                 *TINY, "num_permutations=10"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe_config"]["num_permutations"] == 10
    assert main(["eval", "linear,knn", "--checkpoint", str(out), "probe_epochs=2",
                 "train_subset=100", "test_subset=50"]) == 0
    text = capsys.readouterr().out
    assert "| linear |" in text and "| knn |" in text
    assert (out / "eval" / "eval_linear_knn.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "simclr9"], "unknown recipe 'simclr9'; valid recipes:"),
    (["pretrain", "rotnet", "--data", "/no/such/path"], "--data '/no/such/path': no such path"),
    (["pretrain", "rotnet", "--data", "digits", "lr=fast"], "lr='fast': expected a number"),
    (["pretrain", "rotnet", "--data", "digits", "epoch=3"],
     "unknown config key 'epoch'; valid keys: .*epochs"),
    (["pretrain", "rotnet", "--data", "digits", "optimizer=lbfgs"], "optimizer='lbfgs'"),
    (["pretrain", "colorization", "--data", "digits"], "needs colour"),
    (["pretrain", "rotnet", "--resume"], "--resume needs --out"),
    (["eval", "svm", "--checkpoint", "x.pt"], "unknown evaluation protocol 'svm'"),
    (["eval", "knn", "--checkpoint", "/no/such.pt"], "does not exist"),
])
def test_bad_input_is_a_clear_error_before_training(argv, message, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "r")] if argv[0] == "pretrain" and
                   "--resume" not in argv else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_argparse_rejects_wrong_types(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "rotnet", "--epochs", "three"])
    assert e.value.code == 2 and "--epochs: invalid int value" in capsys.readouterr().err


def test_benchmark_recipes_quick(tmp_path, capsys):
    assert main(["benchmark-recipes", "--quick", "--recipes", "rotnet", "jigsaw", "--data",
                 "digits", "--out", str(tmp_path), "--no-progress", "--eval-train", "200",
                 "--eval-test", "100"]) == 0
    res = json.loads((tmp_path / "recipes_table.json").read_text())
    row, jig = res["rows"]
    assert row["recipe"] == "rotnet" and {"probe", "knn", "random probe", "random knn"} <= set(row)
    assert row["input"] == "image" and "whole image" not in row
    # the patch-based recipe: evaluated on its patch grid, whole images in a note and the JSON
    assert jig["input"] == "3x3 patches" and set(jig["whole image"]) == {
        "probe", "knn", "random probe", "random knn"}
    md = (tmp_path / "recipes_table.md").read_text()
    assert "| rotnet | digits | image |" in md and "| jigsaw | digits | 3x3 patches |" in md
    assert "jigsaw evaluated on whole images instead of its 3x3 patches" in md


def test_demo_smoke(tmp_path, capsys):
    from pyssl.commands.demo import demo

    r = demo(out=str(tmp_path / "demo"), epochs=1, data="digits", subset=64, eval_train=100,
             eval_test=50, progress=False, probe_epochs=2,
             overrides={"batch_size": "32", "backbone_width": "4", "image_size": "16",
                        "tensorboard": "false"})
    text = capsys.readouterr().out
    assert "random init" in text and "rotnet pretrained" in text and "| knn |" in text
    assert len(r["rows"]) == 4 and (tmp_path / "demo" / "demo_table.md").exists()


def _pretrain_as_torchrun_worker(monkeypatch, rank: str, pretrain) -> list[int]:
    """``pyssl pretrain`` as torchrun's worker ``rank`` of 2, with ``pretrain`` in place of the
    engine's; returns the codes it passed to os._exit (which is made to raise, not exit)."""
    import pyssl.engine.run
    from pyssl.commands import pretrain as command

    monkeypatch.setattr(pyssl.engine.run, "pretrain", pretrain)
    exits = []

    class Exited(Exception):
        pass

    def fake_exit(c):
        exits.append(c)
        raise Exited

    monkeypatch.setattr(command.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(Exited):
        main(["pretrain", "rotnet", "--data", "digits"])
    return exits


@pytest.mark.parametrize("rank,status,code", [("0", "finished", 0), ("1", "finished", 0),
                                              ("0", "interrupted", 130)])
def test_torchrun_workers_end_without_interpreter_finalization(monkeypatch, capsys, rank, status, code):
    """Under torchrun (WORLD_SIZE > 1) a finished pretrain worker leaves through os._exit with its
    exit code, after flushing its output: gloo's worker threads may still be releasing tensors,
    which aborts a finalizing interpreter (pyssl.engine.distributed.end_worker)."""
    summary = {"status": status, "step": 4, "loss": 1.5, "seconds": 2.0, "checkpoint": "c.pt",
               "run_dir": "runs/x", "epoch": 1}
    exits = _pretrain_as_torchrun_worker(monkeypatch, rank, lambda *a, **k: summary)
    assert exits == [code]
    out = capsys.readouterr().out
    assert ("[pyssl] done" in out) == (rank == "0" and status == "finished")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: an ordinary return
    monkeypatch.setenv("RANK", "0")
    assert main(["pretrain", "rotnet", "--data", "digits"]) == code and exits == [code]


def test_output_folders_that_cannot_be_written_are_clear_errors(tmp_path, capsys):
    """--out naming a file, or a folder under a file, is refused before any work (it raised
    FileExistsError / NotADirectoryError from deep in the run)."""
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for out, message in ((afile, "is not a folder"), (afile / "sub", r"is not a folder \(.*afile is a file\)")):
        assert main(["pretrain", "rotnet", "--data", "digits", "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert re.search(f"pyssl pretrain: error: --out {re.escape(str(out))}: {message}", err), err
    run = tmp_path / "run"
    assert main(["pretrain", "rotnet", "--data", "digits", "--epochs", "1", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(run), "--out", str(afile), "train_subset=100",
                 "test_subset=50"]) == 2
    assert "--out" in capsys.readouterr().err and afile.read_text() == "hi"
    assert main(["eval", ",", "--checkpoint", str(run)]) == 2
    assert "no evaluation protocol given" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_config_error(tmp_path, capsys):
    assert main(["pretrain", "rotnet", "--data", "digits", "--out", str(tmp_path / "r"), *TINY,
                 "device=cuda"]) == 2
    assert "device=cuda but no CUDA device is available" in capsys.readouterr().err


def test_resume_edge_cases(tmp_path, capsys):
    """A finished run resumed: nothing to do (a traceback before). A resume refused for a changed
    batch size leaves config.json as it was. A corrupt last.pt points at the epoch checkpoints.
    Temporaries of a write killed midway (a dead process's) are removed."""
    run = tmp_path / "run"
    base = ["pretrain", "rotnet", "--data", "digits", "--out", str(run)]
    tiny = [t for t in TINY if not t.startswith("max_steps")]  # a whole epoch: 2 steps
    assert main(base + ["--epochs", "1", *tiny, "keep_every_epochs=1"]) == 0
    capsys.readouterr()
    before = (run / "config.json").read_text()
    stale = run / ".last.pt.tmp-999999999"  # no such process
    stale.write_bytes(b"partial")
    assert main(["pretrain", "rotnet", "--out", str(run), "--resume"]) == 0
    assert "nothing to train: the run" in capsys.readouterr().out
    assert not stale.exists()
    assert main(["pretrain", "rotnet", "--out", str(run), "--resume", "--epochs", "2",
                 "batch_size=16"]) == 2
    assert "steps per epoch" in capsys.readouterr().err
    assert (run / "config.json").read_text() == before
    (run / "last.pt").write_bytes(b"garbage")
    assert main(["pretrain", "rotnet", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "checkpoint_epoch0001.pt: copy it to last.pt" in err


def test_a_diverged_run_is_one_line_and_exit_1(tmp_path, capsys):
    out = tmp_path / "d"
    # 4 steps per epoch: the run diverges before the end-of-epoch checkpoint
    tiny = [t for t in TINY if not t.startswith(("max_steps", "data_subset"))]
    assert main(["pretrain", "rotnet", "--data", "digits", "--out", str(out), *tiny,
                 "data_subset=128", "lr=1e30", "warmup_epochs=0", "max_steps=4"]) == 1
    err = capsys.readouterr().err
    assert "pyssl pretrain: training diverged: the loss became nan in step" in err, err
    assert "no checkpoint had been written yet" in err and "Traceback" not in err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_diverged_torchrun_worker_says_it_once_and_ends_with_1(monkeypatch, capsys, rank):
    """Every rank sees the same all-reduced loss and diverges together: rank 0 alone prints
    the message, and each worker leaves through end_worker with exit code 1."""
    from pyssl.engine.trainer import TrainingDiverged

    def diverging(*a, **k):
        raise TrainingDiverged("the loss became nan in step 3 (epoch 0); ...")

    assert _pretrain_as_torchrun_worker(monkeypatch, rank, diverging) == [1]
    assert ("training diverged: the loss became nan" in capsys.readouterr().err) == (rank == "0")


def test_ctrl_c_outside_training_is_exit_130(monkeypatch, capsys):
    from pyssl.commands import recipes

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "run", interrupted)
    assert main(["recipes"]) == 130
    assert "pyssl: interrupted" in capsys.readouterr().err
