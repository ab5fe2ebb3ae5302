"""`eval` and `sweep` under torchrun (2 ranks, gloo on the CPU) print the same samples' metrics as one process.

The commands run as ``torchrun --standalone --nproc_per_node 2 -m lazymar.cli ...`` with this worktree first on
PYTHONPATH (the installed ``lazymar`` script may belong to another checkout). Small runs: 4 MAR steps, batches of 5
so that both ranks sample (rank 0 batches 0, 2, ..., rank 1 batches 1, 3, ...).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_distributed import launch


def lazymar(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    return launch(["-m", "lazymar.cli", *args], ranks)


def json_of(proc: subprocess.CompletedProcess):
    """The one JSON document on stdout (rank 0 prints it; no other rank prints anything)."""
    return json.loads(proc.stdout)


def test_eval_on_two_ranks_equals_one_process():
    args = ["eval", "--model", "digits", "--num-samples", "10", "--batch-size", "5", "--num-iter", "4",
            "--seed", "5", "--json"]
    one, two = json_of(lazymar(args, 1)), json_of(lazymar(args, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["num_samples"] == two["num_samples"] == 10
    for key in ("accuracy", "fid", "fid_floor"):
        assert one[key] == two[key], key
    assert 0.0 <= one["accuracy"] <= 1.0 and one["fid"] > 0


@pytest.fixture(scope="module")
def tiny_recording(tmp_path_factory) -> Path:
    """A digits recording of 4 steps (sweep checks the model and step count against it)."""
    out = tmp_path_factory.mktemp("torchrun") / "digits4.nc"
    from lazymar.cli import main
    assert main(["record", "--model", "digits", "--num-samples", "2", "--batch-size", "2", "--num-iter", "4",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_sweep_on_two_ranks_equals_one_process(tiny_recording):
    args = ["sweep", "--model", "digits", "--stats", str(tiny_recording), "--no-defaults", "--schedule", "lazymar",
            "--num-samples", "10", "--batch-size", "5", "--num-iter", "4", "--seed", "3", "--json"]
    one, two = json_of(lazymar(args, 1)), json_of(lazymar(args, 2))
    assert [r["name"] for r in one] == [r["name"] for r in two] == ["none", "lazymar"]
    assert {r["world_size"] for r in one} == {1} and {r["world_size"] for r in two} == {2}
    for a, b in zip(one, two):
        for key in ("flops_ratio", "psnr", "token_mse", "accuracy", "fid"):
            assert a[key] == b[key], (a["name"], key)
    assert one[0]["token_mse"] == 0.0  # the reference against itself
    assert one[1]["flops_ratio"] > 1.0 and one[1]["token_mse"] > 0.0


def test_sample_on_two_ranks_writes_the_same_grid_as_one_process(tmp_path):
    import matplotlib.image
    import numpy as np
    grids = []
    for ranks in (1, 2):
        out = tmp_path / f"grid{ranks}.png"
        result = json_of(lazymar(["sample", "--model", "digits", "--labels", "0-2", "--per-label", "2",
                                  "--batch-size", "2", "--num-iter", "4", "--seed", "9", "--out", str(out),
                                  "--json"], ranks))
        assert (result["world_size"], result["num_samples"]) == (ranks, 6)
        grids.append(matplotlib.image.imread(out))
    np.testing.assert_array_equal(grids[0], grids[1])


def test_measured_derive_on_two_ranks_takes_the_same_path(tiny_recording, tmp_path):
    """Every rank measures its share of each candidate and gets the merged PSNR, so the ranks search alike and
    rank 0 writes the schedule one process writes."""
    outs = [tmp_path / f"derived{ranks}.json" for ranks in (1, 2)]
    results = [json_of(lazymar(["derive", "--model", "digits", "--stats", str(tiny_recording), "--num-iter", "4",
                                "--target-flops-ratio", "1.5", "--measure-samples", "6", "--batch-size", "3",
                                "--candidates", "1", "--out", str(out), "--json"], ranks))
               for ranks, out in zip((1, 2), outs)]
    one, two = results
    assert one["name"] == two["name"] and len(one["measured"]) >= 2
    assert [(m["name"], m["psnr"]) for m in one["measured"]] == [(m["name"], m["psnr"]) for m in two["measured"]]
    assert json.loads(outs[0].read_text()) == json.loads(outs[1].read_text())


def test_bench_on_two_ranks_equals_one_process():
    """Each rank compares its own samples of the two runs; the merged fidelity and quality equal one process's."""
    args = ["bench", "--model", "digits", "--schedule", "lazymar", "--num-samples", "10", "--batch-size", "5",
            "--num-iter", "4", "--repeats", "1", "--seed", "2", "--json"]
    one, two = json_of(lazymar(args, 1)), json_of(lazymar(args, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("flops_ratio", "psnr", "token_mse"):
        assert one[key] == two[key], key
    for run in ("baseline", "cached"):
        for key in ("flops", "accuracy", "fid", "repeats_identical"):
            assert one[run][key] == two[run][key], (run, key)
    assert one["token_mse"] > 0 and one["flops_ratio"] > 1
