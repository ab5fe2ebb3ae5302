"""Every bad input gets one clear line on stderr, exit code 2, no traceback, and writes nothing (issue 11).

Each case runs the CLI in-process. Validation happens before any model is loaded or any sample is drawn, so each
case takes milliseconds; a slow case here means a check came too late.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lazymar.cache.schedule_file import lazymar_schedule
from lazymar.cli import main
from lazymar.config import get_config
from lazymar.errors import LazymarError, NonFiniteError, SettingsError
from lazymar.model import MAR
from lazymar.recording import save_stats
from lazymar.sampling import SamplingSettings, generate
from builders import checkpoint, tiny_mar
from test_derive import keep_test_similarity, synthetic


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working directory with the input files the cases refer to."""
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (tmp_path / "folder").mkdir()
    save_stats(synthetic(v_similarity={1: keep_test_similarity()}), inputs / "stats.nc")
    nan = synthetic(v_similarity={1: keep_test_similarity()})
    nan["token_cosine"][:] = np.nan
    save_stats(nan, inputs / "nan_stats.nc")
    schedule = lazymar_schedule(64, get_config("digits")).to_dict()
    for name, changes in {"seed_string": {"seed": "0"}, "seed_float": {"seed": 1.5}, "seed_null": {"seed": None},
                          "seed_huge": {"seed": 2**63}, "keep_string": {"always_keep": "new"}}.items():
        (inputs / f"{name}.json").write_text(json.dumps({**schedule, **changes}))
    nan = checkpoint(tiny_mar(randomise="none"))
    nan["model"]["decoder_blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(nan, inputs / "nan.pth")
    (tmp_path / "notes.md").write_text("my notes\n")
    (tmp_path / "old.png").write_bytes(b"old")
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


S = "inputs/stats.nc"
CASES = [
    # (argv, words the one line must contain)
    (["sample", "--cfg", "nan"], ["--cfg", "finite"]),
    (["sample", "--temperature", "nan"], ["--temperature", "finite"]),
    (["sample", "--temperature", "0"], ["--temperature", "> 0"]),
    (["sample", "--model", "inputs/nan.pth", "--out", "x.png"], ["decoder_blocks.1.mlp.fc1.weight", "non-finite"]),
    (["bench", "--num-samples", "0"], ["--num-samples", ">= 1"]),
    (["flops", "--batch-size", "-3"], ["--batch-size", ">= 1"]),
    (["derive", "--stats", S, "--flops-batch-size", "0"], ["--flops-batch-size", ">= 1"]),
    (["sample", "--num-iter", "100000"], ["--num-iter", "[1, 64]"]),
    (["sample", "--num-iter", "65", "--schedule", "lazymar"], ["--num-iter", "[1, 64]"]),
    (["eval", "--num-iter", "65"], ["--num-iter", "[1, 64]"]),
    (["flops", "--num-iter", "300"], ["--num-iter", "[1, 256]"]),
    (["sample", "--out", "folder"], ["folder", "directory"]),
    (["sample", "--out", "old.png"], ["old.png", "exists", "--force"]),
    (["sample", "--out", "x.gif"], ["x.gif", "image type"]),
    (["sample", "--out", "old.png/x.png"], ["old.png", "not a directory"]),
    (["record", "--out", "folder"], ["folder", "directory"]),
    (["merge-stats", "folder", S], ["folder", "directory"]),
    (["merge-stats", "notes.md", S], ["notes.md", "exists"]),
    (["record", "--out", "r.nc", "--keep-bits", "abc"], ["--keep-bits", "abc"]),
    (["record", "--out", "r.nc", "--keep-bits", "40"], ["--keep-bits", "1..22"]),
    (["sample", "--schedule", "inputs/seed_string.json"], ["seed", "'0'"]),
    (["sample", "--schedule", "inputs/seed_float.json"], ["seed", "1.5"]),
    (["sample", "--schedule", "inputs/seed_null.json"], ["seed", "None"]),
    (["sample", "--schedule", "inputs/seed_huge.json"], ["seed", "2**63"]),
    (["sample", "--schedule", "inputs/keep_string.json"], ["always_keep", "list"]),
    (["sample", "--schedule", "nonesuch"], ["--schedule", "nonesuch", "not a preset"]),
    (["sample", "--seed", "99999999999999999999999"], ["--seed", "2**63"]),
    (["sample", "--seed", "-1"], ["--seed", "2**63"]),
    (["bench", "--repeats", "0"], ["--repeats", ">= 1"]),
    (["bench", "--threads", "-1"], ["--threads", ">= 1"]),
    (["bench", "--compute-bound", "--num-iter", "257"], ["--num-iter", "[1, 256]"]),
    (["train", "--out", "t.pth", "--width", "7"], ["width 7", "attention heads"]),
    (["train", "--out", "t.pth", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["train", "--out", "t.pth", "--num-iter", "65"], ["sampling steps", "[1, 64]"]),
    (["train", "--out", "old.png"], ["old.png", "exists"]),
    (["train", "--out", "new.pth"], ["new_loss.png", "exists"]),  # a side file (the loss curve) exists
    (["sample", "--labels", "5-2"], ["--labels", "5-2", "empty"]),
    (["sample", "--labels", "a,b"], ["--labels", "cannot read labels"]),
    (["sample", "--labels", "12", "--num-iter", "2"], ["label 12", "out of range"]),
    (["sample", "--per-label", "0"], ["--per-label", ">= 1"]),
    (["sample", "--batch-size", "-1"], ["--batch-size", ">= 1"]),
    (["eval", "--num-samples", "0"], ["--num-samples", ">= 1"]),
    (["derive", "--stats", S, "--measure-samples", "0"], ["--measure-samples", ">= 1"]),
    (["derive", "--stats", S, "--candidates", "0"], ["--candidates", ">= 1"]),
    (["derive", "--stats", S, "--target-flops-ratio", "0.5"], ["--target-flops-ratio", "> 1"]),
    (["derive", "--stats", S, "--target-flops-ratio", "2", "--min-psnr", "30"], ["--min-psnr", "not allowed"]),
    (["derive", "--stats", S, "--out", "notes.json"], ["notes.md", "exists", "--force"]),
    (["derive", "--stats", S, "--out", "sched.md"], ["sched.md", "twice"]),
    (["derive", "--stats", S, "--out", "folder"], ["folder", "directory"]),
    (["derive", "--stats", "inputs/nan_stats.nc", "--tau-token", "0.5"], ["token_cosine", "no finite values"]),
    (["derive", "--stats", "inputs/missing.nc"], ["missing.nc", "not found"]),
    (["sweep", "--out", "folder", "--no-defaults", "--schedule", "none"], ["folder", "directory"]),
    (["sweep", "--threads", "0", "--no-defaults"], ["--threads", ">= 1"]),
    (["sample", "--device", "nonsense"], ["--device", "nonsense"]),
    (["flops", "--arch", "mar_enormous"], ["--arch", "mar_enormous"]),
]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_gets_one_line_and_writes_nothing(work, capsys, monkeypatch, argv, words):
    def late(*args, **kwargs):
        raise AssertionError("validation came too late: the command started sampling or training")
    monkeypatch.setattr(MAR, "forward_transformer", late)
    monkeypatch.setattr("lazymar.train.mar_loss", late)
    (work / "new_loss.png").write_bytes(b"old")
    before = snapshot(work)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lazymar {argv[0]}: error: ")
    assert "Traceback" not in captured.err and captured.out == ""
    for word in words:
        assert word in lines[0]
    assert snapshot(work) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_one_line(work, capsys):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for argv in (["sample", "--out", "locked/x.png"], ["record", "--out", "locked/r.nc"],
                     ["merge-stats", "locked/m.nc", S]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "permission denied" in err
    finally:
        locked.chmod(0o700)


def test_ctrl_c_prints_stopped_and_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("lazymar.commands.common.load_model", interrupted)
    assert main(["eval", "--num-samples", "1"]) == 130
    assert capsys.readouterr().err == "lazymar eval: stopped\n"


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr("lazymar.commands.common.load_model", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["eval", "--num-samples", "1"])


def test_an_os_error_names_the_file(monkeypatch, capsys):
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/ckpt.pth")
    monkeypatch.setattr("lazymar.commands.common.load_model", unreadable)
    assert main(["eval", "--num-samples", "1"]) == 2
    assert capsys.readouterr().err == "lazymar eval: error: /some/ckpt.pth: Permission denied\n"


def test_sample_out_without_suffix_writes_and_names_the_png(work, capsys):
    assert main(["sample", "--labels", "0", "--per-label", "1", "--num-iter", "1", "--out", "grid"]) == 0
    assert (work / "grid.png").is_file() and not (work / "grid").exists()
    assert capsys.readouterr().out.startswith("wrote grid.png:")


def test_sweep_without_defaults_needs_no_recording(work, capsys):
    """Outside the repository, --no-defaults with --schedule runs without data/stats/digits.nc."""
    assert main(["sweep", "--no-defaults", "--schedule", "none", "--num-samples", "1", "--num-iter", "1",
                 "--no-quality", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["name"] for r in rows} == {"none", "lazymar"}  # the default --baseline joins the points


# --- the library checks behind the CLI ---------------------------------------------------------------------
@pytest.mark.parametrize("changes", [dict(cfg=float("nan")), dict(cfg=float("inf")), dict(temperature=float("nan")),
                                     dict(temperature=0.0), dict(num_iter=0)])
def test_sampling_settings_reject_non_finite_values(changes):
    with pytest.raises(SettingsError):
        SamplingSettings(**changes)


def test_generate_rejects_more_steps_than_tokens():
    model = tiny_mar(num_sampling_steps="2", randomise="none")
    with pytest.raises(SettingsError, match="num_iter 65 exceeds the model's 64 tokens"):
        generate(model, [0], SamplingSettings(num_iter=65))


def test_non_finite_features_stop_sampling_naming_the_step_and_layer():
    model = tiny_mar(num_sampling_steps="2", randomise="none")
    assert torch.isfinite(generate(model, [0, 1], SamplingSettings(num_iter=3, cfg=2.0))).all()
    with torch.no_grad():
        model.encoder_blocks[1].mlp.fc2.bias[3] = float("inf")
    with pytest.raises(NonFiniteError, match="step 0 in encoder_blocks.1"):
        generate(model, [0, 1], SamplingSettings(num_iter=3, cfg=2.0))
    assert issubclass(NonFiniteError, LazymarError)
