"""The GPU user's path, checked in one run (issue 19): ``python benchmarks/gpu_check.py`` on a CUDA machine (under 8
minutes on one H100) writes ``data/bench/gpu_check.json``.

Checks, each recorded with ``passed`` (or ``skipped`` and why), its seconds and its numbers:

- ``conformance``: the official-implementation fixtures (tests/test_conformance.py) on the device;
- ``cache_exactness``: the cache engine with float32 caches and a schedule that reuses nothing reproduces the
  uncached sampler bit for bit on the device (digits16);
- ``precision``: the lazymar preset's fidelity (PSNR against the uncached run of the same precision) under fp32,
  bf16 and fp16 autocast, and each precision's uncached images and tokens against fp32 (digits16); passes when
  every PSNR is within 0.5 dB of the fp32 one (the issue's target; the quick run only checks that it runs);
- ``mar_base``: MAR-B-shaped random weights (``lazymar bench --compute-bound``'s model), batch 64 and 64 steps,
  uncached against lazymar: FLOPs, wall seconds and peak memory, in fp32 and in the default precision;
- ``torchrun``: ``eval`` on 2 ranks equals 1 rank (where there are 2 GPUs; skipped otherwise);
- ``commands``: sample, eval, bench, record, sweep, derive (measured search) and search-quality with ``--device``,
  each as a subprocess (exit code, seconds, the end of stderr when it failed).

``--device cpu --quick`` is the dry run with tiny sizes that CI runs (tests/test_gpu_check.py); until someone runs
the script on a GPU it is the only check of this path. Exit code 0 when every check passed or was skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# sizes of the full run (a GPU) and of the quick dry run (CI's CPU)
SIZES = {
    "full": dict(fidelity_samples=300, fidelity_batch=100, fidelity_iter=64, exact_samples=20, exact_iter=64,
                 arch="mar_base", bench_batch=64, bench_iter=64, command_iter=8, torchrun_samples=40),
    "quick": dict(fidelity_samples=2, fidelity_batch=2, fidelity_iter=2, exact_samples=2, exact_iter=2,
                  arch="mar_tiny", bench_batch=2, bench_iter=4, command_iter=2, torchrun_samples=4),
}
PSNR_TOLERANCE_DB = 0.5


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_process(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run argv in the repository; its exit code, seconds and, when it failed, the end of its output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=REPO, env=env or environment(), capture_output=True, text=True,
                              timeout=timeout)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout_error:
        code, out, err = None, "", f"timed out after {timeout_error.timeout:.0f} s"
    result = {"argv": argv[1:] if argv[0] == sys.executable else argv, "returncode": code,
              "seconds": round(time.perf_counter() - start, 2)}
    if code != 0:
        result["output_tail"] = (out + err)[-1500:]
    result["stdout"] = out
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazymar.cli", *args]


# --- the checks ---------------------------------------------------------------------------------------------------
def check_conformance(device: str, sizes: dict) -> dict:
    env = {**environment(), "LAZYMAR_TEST_DEVICE": device}
    run = run_process([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conformance.py"],
                      timeout=300, env=env)
    run.pop("stdout")
    return {"passed": run["returncode"] == 0, **run}


def check_cache_exactness(device: str, sizes: dict) -> dict:
    from lazymar.cache.engine import CacheEngine
    from lazymar.cache.schedule_file import none_schedule
    from lazymar.checkpoint import load_model
    from lazymar.sampling import SamplingSettings, generate
    model = load_model("digits16", device=device)
    settings = SamplingSettings(num_iter=sizes["exact_iter"], cfg=3.0)
    labels = [i % 10 for i in range(sizes["exact_samples"])]
    plain = generate(model, labels, settings, seed=0)
    engine = CacheEngine(none_schedule(settings.num_iter), cache_dtype=torch.float32)
    cached = generate(model, labels, settings, seed=0, runner=engine)
    return {"passed": bool(torch.equal(plain, cached)), "max_abs_difference": float((plain - cached).abs().max()),
            "num_samples": len(labels), "num_iter": settings.num_iter}


def check_precision(device: str, sizes: dict, seed: int = 7) -> dict:
    from dataclasses import replace

    from lazymar.cache.schedule_file import load_schedule
    from lazymar.checkpoint import load_model
    from lazymar.runs import Reference, SamplePlan
    from lazymar.runs.compare import fidelity
    model = load_model("digits16", device=device)
    precisions = sizes.get("precisions")
    if precisions is None:
        precisions = ("fp32", "bf16", "fp16") if torch.device(device).type == "cuda" or not sizes["quick"] \
            else ("fp32", "bf16")
    precisions = ("fp32", *(p for p in precisions if p != "fp32"))  # the others are compared with fp32
    base = replace(model.sampling_defaults, num_iter=sizes["fidelity_iter"])
    plan = SamplePlan.balanced(sizes["fidelity_samples"], model.config.class_num, seed, sizes["fidelity_batch"])
    schedule = load_schedule("lazymar", base.num_iter, model.config)
    rows, fp32_run = {}, None
    for precision in precisions:
        reference = Reference(model, plan, replace(base, precision=precision), evaluator=None)
        _, cached = reference.measure(schedule, quality=False)
        row = {"lazymar_psnr": cached["psnr"], "lazymar_token_mse": cached["token_mse"],
               "lazymar_flops_ratio": cached["flops_ratio"]}
        if fp32_run is None:
            fp32_run = reference.run
        else:  # this precision's uncached run against the fp32 one
            against = fidelity(reference.run, fp32_run)
            row.update(uncached_psnr_vs_fp32=against["psnr"], uncached_token_mse_vs_fp32=against["token_mse"])
        rows[precision] = row
        print(f"gpu_check: precision {precision}: {json.dumps(row, default=float)}", file=sys.stderr, flush=True)
    fp32_psnr = rows["fp32"]["lazymar_psnr"] if "fp32" in rows else None
    finite = all(math.isfinite(v) or v == math.inf for r in rows.values() for v in r.values() if v is not None)
    close = {p: abs(r["lazymar_psnr"] - fp32_psnr) <= PSNR_TOLERANCE_DB for p, r in rows.items()} \
        if fp32_psnr is not None else {}
    return {"passed": finite and (sizes["quick"] or all(close.values())), "within_0.5_dB_of_fp32": close,
            "num_samples": plan.num_samples, "num_iter": base.num_iter, "seed": seed, "model": "digits16",
            "precisions": rows}


def check_mar_base(device: str, sizes: dict) -> dict:
    from dataclasses import replace

    from lazymar.runs.bench import benchmark
    from lazymar.cache.schedule_file import load_schedule
    from lazymar.random_weights import random_model
    from lazymar.precision import default_precision
    from lazymar.runs import SamplePlan
    model = random_model(sizes["arch"], 0, device)
    # the head's x0 clamped to [-1, 1] (a clamp per head step, no FLOPs): an untrained head samples tokens of size
    # 1e4 and more, which fp16 cannot hold; trained models do not need it
    model.diffloss.clip_denoised = True
    settings = replace(model.sampling_defaults, num_iter=sizes["bench_iter"], cfg=3.0)
    plan = SamplePlan.balanced(sizes["bench_batch"], model.config.class_num, 0, sizes["bench_batch"])
    schedule = load_schedule("lazymar", settings.num_iter, model.config)
    out = {"arch": sizes["arch"], "batch_size": sizes["bench_batch"], "num_iter": settings.num_iter, "runs": {}}
    for precision in dict.fromkeys(("fp32", default_precision(model))):
        result = benchmark(model, plan, replace(settings, precision=precision), schedule, repeats=1, progress=False)
        out["runs"][precision] = {
            **{f"{name}_{key}": result[name][key] for name in ("baseline", "cached")
               for key in ("flops", "seconds", "peak_memory_mb")},
            **{key: result[key] for key in ("flops_ratio", "wall_ratio", "memory_ratio", "token_mse")}}
    out["passed"] = all(r["flops_ratio"] > 1 and math.isfinite(r["token_mse"]) for r in out["runs"].values())
    return out


def check_torchrun(device: str, sizes: dict) -> dict:
    if torch.device(device).type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 CUDA devices"}
    args = ["eval", "--model", "digits16", "--device", "cuda", "--num-samples", str(sizes["torchrun_samples"]),
            "--batch-size", "10", "--num-iter", "8", "--seed", "5", "--json"]
    one = run_process(cli(*args), timeout=300)
    two = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "lazymar.cli", *args], timeout=300)
    out = {"one_rank": {k: v for k, v in one.items() if k != "stdout"},
           "two_ranks": {k: v for k, v in two.items() if k != "stdout"}, "passed": False}
    if one["returncode"] == 0 and two["returncode"] == 0:
        a, b = json.loads(one["stdout"]), json.loads(two["stdout"])
        out["scores"] = {key: [a[key], b[key]] for key in ("accuracy", "fid")}
        out["passed"] = b["world_size"] == 2 and all(abs(a[k] - b[k]) <= 1e-6 for k in ("accuracy", "fid"))
    return out


def check_commands(device: str, sizes: dict) -> dict:
    n = str(sizes["command_iter"])
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        digits = ["--model", "digits", "--device", device, "--num-iter", n]
        commands = {
            "sample": cli("sample", *digits, "--labels", "0-9", "--per-label", "1", "--precision", "bf16",
                          "--out", f"{tmp}/samples.png", "--json"),
            "eval": cli("eval", *digits, "--num-samples", "10", "--batch-size", "10", "--json"),
            "bench": cli("bench", *digits, "--num-samples", "10", "--batch-size", "10", "--repeats", "1", "--json"),
            "record": cli("record", *digits, "--num-samples", "8", "--batch-size", "4", "--out", f"{tmp}/stats.nc",
                          "--json"),
            "sweep": cli("sweep", *digits, "--no-defaults", "--schedule", "lazymar", "--num-samples", "10",
                         "--batch-size", "10", "--no-quality", "--json"),
            "derive": cli("derive", *digits, "--stats", f"{tmp}/stats.nc", "--target-flops-ratio", "1.2",
                          "--candidates", "1", "--measure-samples", "4", "--batch-size", "4", "--json"),
            # exit 1: no schedule met the floor, a result too; 200 samples is the command's minimum
            "search-quality": cli("search-quality", *digits, "--base", "lazymar", "--target-flops-ratio", "1.1",
                                  "--candidates", "1", "--num-samples", "200", "--batch-size", "200", "--json"),
        }
        runs = {}
        for name, argv in commands.items():
            run = run_process(argv, timeout=600)
            run.pop("stdout")
            run["passed"] = run["returncode"] in ((0, 1) if name == "search-quality" else (0,))
            runs[name] = run
    return {"passed": all(r["passed"] for r in runs.values()), "commands": runs}


CHECKS: dict[str, Callable[[str, dict], dict]] = {
    "conformance": check_conformance, "cache_exactness": check_cache_exactness, "precision": check_precision,
    "mar_base": check_mar_base, "torchrun": check_torchrun, "commands": check_commands,
}


def run_checks(device: str, quick: bool, only: list[str] | None = None, **overrides) -> dict:
    sizes = {**SIZES["quick" if quick else "full"], **{k: v for k, v in overrides.items() if v is not None},
             "quick": quick}
    report = {"device": device, "device_name": torch.cuda.get_device_name(device)
              if torch.device(device).type == "cuda" else "cpu", "torch": torch.__version__,
              "cuda_devices": torch.cuda.device_count(), "quick": quick,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "checks": {}}
    for name in only or CHECKS:
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            with torch.no_grad():
                result = CHECKS[name](device, sizes)
        except Exception as err:  # a check that crashes fails; the others still run
            result = {"passed": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        status = "skipped" if "skipped" in result else ("passed" if result["passed"] else "FAILED")
        print(f"gpu_check: {name} {status} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
        report["checks"][name] = result
    report["passed"] = all(r.get("passed", False) or "skipped" in r for r in report["checks"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu for the dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every check (CI, on the CPU)")
    parser.add_argument("--out", default=str(REPO / "data" / "bench" / "gpu_check.json"), help="JSON to write")
    parser.add_argument("--only", nargs="+", choices=tuple(CHECKS), default=None, help="run only these checks")
    parser.add_argument("--fidelity-samples", type=int, default=None, help="samples of the precision check")
    parser.add_argument("--fidelity-iter", type=int, default=None, help="MAR steps of the precision check")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                        help="precisions of the precision check (default: all three on CUDA; fp32 and bf16 on the "
                             "CPU's quick run)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu for the dry run")
    report = run_checks(args.device, args.quick, args.only, fidelity_samples=args.fidelity_samples,
                        fidelity_iter=args.fidelity_iter, precisions=args.precisions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"gpu_check: {'passed' if report['passed'] else 'FAILED'}; wrote {out}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
