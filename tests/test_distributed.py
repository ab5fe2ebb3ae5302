"""The torchrun layer (lazymar.distributed): a world of one without torchrun, and a real 2-rank gloo run
(tests/distributed_worker.py) whose gathered tensors, plan-ordered samples and metrics equal one process's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lazymar import distributed
from lazymar.sampling import generate

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- one process, no torchrun ------------------------------------------------------------------------
@pytest.fixture
def no_torchrun(monkeypatch):
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def test_without_torchrun_it_is_a_world_of_one(no_torchrun):
    with distributed.launched("cpu") as device:
        assert device == torch.device("cpu")
        assert not torch.distributed.is_initialized() and not distributed.active()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        distributed.barrier()
        x = torch.arange(6.0).reshape(3, 2)
        assert distributed.gather_tensors(x) is x and distributed.gather_tensors(x, dst=None) is x
        assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
        assert torch.equal(distributed.gather_samples(x, [2, 0, 1]), x[[1, 2, 0]])


def test_gather_samples_checks_its_indices(no_torchrun):
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="3 rows but 2 sample indices"):
        distributed.gather_samples(x, [0, 1])
    with pytest.raises(ValueError, match="0..N-1 each exactly once"):
        distributed.gather_samples(x, [0, 2, 2])


def test_cuda_means_the_local_rank_under_torchrun(monkeypatch, no_torchrun):
    assert distributed.rank_device("cuda") == torch.device("cuda")  # one process: the current device
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device("cuda") == torch.device("cuda", 1)
    assert distributed.rank_device("cuda:3") == torch.device("cuda", 3)  # an explicit choice is kept
    assert distributed.rank_device("cpu") == torch.device("cpu")


# --- two ranks on gloo -------------------------------------------------------------------------------
def torchrun_command() -> list[str]:
    """torchrun next to this interpreter, else the module it runs."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def launch(args: list[str], ranks: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` as one plain process (ranks=1) or under torchrun with ``ranks`` CPU ranks, from the repository
    root with this checkout first on PYTHONPATH (the installed ``lazymar`` may belong to another checkout), one
    thread per process and no torchrun variables inherited; asserts that it succeeded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    launcher = [sys.executable] if ranks == 1 else [*torchrun_command(), "--standalone", "--nproc_per_node",
                                                    str(ranks)]
    proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_worker(out: Path, ranks: int) -> dict:
    launch([str(WORKER), str(out)], ranks, timeout=180)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("distributed")
    return run_worker(folder / "one.pt", 1), run_worker(folder / "two.pt", 2)


def test_two_ranks_gather_in_rank_order(runs):
    _, two = runs
    assert (two["rank"], two["world_size"]) == (0, 2)
    assert two["tensors_to_0"].tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]  # rank 0: 2 rows, rank 1: 3 rows
    assert two["tensors_to_all"].shape == (5, 3) and two["tensors_to_all"][:, 2].tolist() == [0, 1, 10, 11, 12]
    assert two["objects_to_0"] == [{"rank": 0, "rows": 2}, {"rank": 1, "rows": 3}]
    assert two["objects_to_all"] == [0, 1]


def test_plan_batches_over_two_ranks_equal_one_process_bit_for_bit(runs):
    one, two = runs
    assert two["plan_tokens"].shape == (7, 64, 16)
    assert torch.equal(one["plan_tokens"], two["plan_tokens"])


def test_one_process_run_is_the_plain_generation(runs, one_thread):
    """The worker's one-process tokens are generate() of each batch with its seed, in plan order (on one thread,
    as the worker ran)."""
    from distributed_worker import PLAN, SETTINGS, plan_model  # tests/ is on the path of the test modules

    model = plan_model()
    expected = torch.cat([generate(model, b.labels, SETTINGS, seed=torch.Generator().manual_seed(b.seed))
                          for b in PLAN.batches()])
    assert torch.equal(runs[0]["plan_tokens"], expected)
    assert [len(b.labels) for b in PLAN.batches(0, 2)] == [2, 2] and [len(b.labels) for b in PLAN.batches(1, 2)] == [2, 1]


def test_metrics_over_two_ranks_equal_one_process(runs):
    one, two = runs
    np.testing.assert_array_equal(one["mu"], two["mu"])
    np.testing.assert_array_equal(one["sigma"], two["sigma"])
    assert one["fid"] == two["fid"] and one["inception_score"] == two["inception_score"]
    assert np.isfinite(one["fid"]) and one["inception_score"][0] > 1.0


def test_scoring_on_every_rank_equals_one_process(runs):
    """Each rank decodes and scores its own samples, batch by batch as one process does; the merged quality and
    fidelity equal one process's (bit for bit: the FID sums are compensated, the rest in sample order), on every
    rank, and the per-sample values (for resampling) come back in sample order."""
    one, two = runs
    assert one["ranks_agree"] and two["ranks_agree"]
    assert one["digits"]["row"] == two["digits"]["row"] and one["digits"]["base"] == two["digits"]["base"]
    assert one["digits"]["row"]["psnr"] < float("inf") and one["digits"]["base"]["psnr"] == float("inf")
    for key in ("tokens", "images"):
        np.testing.assert_array_equal(one["digits"]["errors"][key], two["digits"]["errors"][key])
        assert one["digits"]["errors"][key].shape == (10,)
    for key in ("correct", "features"):
        np.testing.assert_array_equal(one["digits"]["per_sample"][key], two["digits"]["per_sample"][key])
    assert one["digits"]["per_sample"]["correct"].mean() == one["digits"]["row"]["accuracy"]
    for part in ("row", "base"):
        a, b = one["imagenet"][part], two["imagenet"][part]
        assert set(a) == set(b) and np.isfinite(a["fid"])
        assert a == b, part
    assert one["imagenet"]["features"].shape == (7, 64)
    np.testing.assert_array_equal(one["imagenet"]["features"], two["imagenet"]["features"])
