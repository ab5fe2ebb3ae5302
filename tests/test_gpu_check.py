"""benchmarks/gpu_check.py's dry run on the CPU (``--device cpu --quick``): every check runs at tiny sizes and passes,
and the report goes where --out says (nothing into data/). Until someone runs the script on a GPU, this is the only
check of the GPU user's path (README, "Precision")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

CHECKS = ("conformance", "cache_exactness", "precision", "mar_base", "torchrun", "commands")
COMMANDS = ("sample", "eval", "bench", "record", "sweep", "derive", "search-quality")


def test_the_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True and report["passed"] is True
    checks = report["checks"]
    assert tuple(checks) == CHECKS
    assert checks["torchrun"]["skipped"] == "needs 2 CUDA devices"
    for name in CHECKS[:4] + CHECKS[5:]:
        assert checks[name]["passed"] is True, (name, checks[name])
    assert checks["cache_exactness"]["max_abs_difference"] == 0.0
    assert set(checks["precision"]["precisions"]) == {"fp32", "bf16"}
    assert "uncached_psnr_vs_fp32" in checks["precision"]["precisions"]["bf16"]
    bench = checks["mar_base"]["runs"]["fp32"]
    assert bench["baseline_flops"] > bench["cached_flops"] > 0 and bench["baseline_seconds"] > 0
    runs = checks["commands"]["commands"]
    assert tuple(runs) == COMMANDS
    for name in COMMANDS:
        assert "--device" in runs[name]["argv"] and runs[name]["argv"][runs[name]["argv"].index("--device") + 1] == "cpu"
        assert runs[name]["returncode"] == 0 or (name == "search-quality" and runs[name]["returncode"] == 1), runs[name]
