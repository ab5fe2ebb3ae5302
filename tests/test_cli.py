"""The sample / eval / train commands on the embedded model, and their one-line errors."""
import json
import sys

import pytest

from lazymar.cli import main
from lazymar.grid import parse_labels


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_subcommand_has_help(capsys):
    for command in ("sample", "eval", "train", "record", "merge-stats", "bench", "flops", "derive", "sweep"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lazymar " + command in capsys.readouterr().out


def test_sample_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--labels", "3,7", "--per-label", "2", "--num-iter", "4", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 4 and result["num_iter"] == 4 and result["cfg"] == 3.0  # the stored default cfg
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reports_accuracy_and_fid(capsys):
    assert main(["eval", "--num-samples", "10", "--num-iter", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "fid", "fid_floor", "num_samples", "seconds"} <= result.keys()
    assert result["num_samples"] == 10 and 0.0 <= result["accuracy"] <= 1.0 and result["fid"] > result["fid_floor"] > 0


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "/nonexistent/ckpt.pth"], "not found"),
    (["sample", "--labels", "a,b"], "cannot read labels"),
    (["sample", "--labels", "12", "--num-iter", "2"], "out of range"),
    (["eval", "--schedule", "bogus"], "unknown schedule"),
])
def test_bad_input_gets_one_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "x.png")] if argv[0] == "sample" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_train_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "model.pth"
    out.write_bytes(b"")
    assert main(["train", "--out", str(out), "--steps", "1"]) == 2
    assert "--force" in capsys.readouterr().err


def test_parse_labels():
    assert parse_labels("0-3,7") == [0, 1, 2, 3, 7]


def test_eval_and_the_bench_baseline_see_the_same_samples(capsys):
    common = ["--num-samples", "6", "--batch-size", "4", "--num-iter", "3", "--seed", "5", "--json"]
    assert main(["eval", *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert main(["bench", "--schedule", "lazymar", "--repeats", "1", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    baseline = result["baseline"]
    assert (baseline["accuracy"], baseline["fid"]) == (evaluated["accuracy"], evaluated["fid"])
    assert (baseline["roughness"], baseline["roughness_real"]) == (evaluated["roughness"], evaluated["roughness_real"])
    # CPU memory comes from one more, untimed repetition per run: one timing each, tokens still identical
    for run in (baseline, result["cached"]):
        assert len(run["seconds_all"]) == 1 and run["repeats_identical"]
        if sys.platform == "linux":
            assert run["peak_memory_mb"] is not None and run["peak_memory_mb"] > 0


def test_bench_of_a_latent_model_without_vae_compares_tokens(capsys):
    """Random latent-space weights (as --compute-bound) have no image space: bench still runs and reports token MSE,
    with PSNR left out, instead of asking for a VAE."""
    code = main(["bench", "--random-init", "--arch", "mar_tiny", "--num-iter", "2", "--num-samples", "2",
                 "--batch-size", "2", "--repeats", "1", "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["psnr"] is None and result["token_mse"] >= 0 and result["flops_ratio"] > 1


def test_eval_pools_seeds_with_intervals(capsys):
    """--seeds: each seed's scores under per_seed, the pooled accuracy their mean (equal sample counts), 95 %
    intervals around the pooled numbers."""
    common = ["--num-samples", "6", "--batch-size", "6", "--num-iter", "2", "--bootstrap", "200", "--json"]
    assert main(["eval", "--seeds", "5", "6", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seeds"] == [5, 6] and result["num_samples"] == 12 and set(result["per_seed"]) == {"5", "6"}
    per_seed = [result["per_seed"][s]["accuracy"] for s in ("5", "6")]
    assert result["accuracy"] == pytest.approx(sum(per_seed) / 2)
    for key in ("accuracy", "fid"):
        assert result[f"{key}_ci_low"] <= result[key] <= result[f"{key}_ci_high"]
    assert main(["eval", "--seed", "6", *common]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["per_seed"]["6"]["accuracy"]
