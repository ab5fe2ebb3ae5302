"""Overhead of the redundancy recorder on the digits model: sampling wall time with and without it.

Same process, interleaved repetitions (plain, recorded, plain, ...), medians. Peak memory added is measured
in fresh child processes (growth of the peak resident set during one plain and one recorded generation,
lazymar.runs.memory.PeakMemory; CUDA: peak allocated) and compared with the bound: the previous step's features as the recorder
keeps them, this step's stashed features (at most LAYER_CHUNK layers, HEAD_CHUNK head steps) and the output arrays
(see ``bound_bytes``). Prints one JSON object.

    python benchmarks/recording_overhead.py [--batch-size 16] [--repeats 3] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazymar import MAR, get_config  # noqa: E402
from lazymar.random_weights import RANDOM_MODEL_SAMPLING, random_mar  # noqa: E402
from lazymar.recording import RedundancyRecorder, save_stats  # noqa: E402
from lazymar.runs.memory import PeakMemory, resident_mb  # noqa: E402
from lazymar.sampling import SamplingSettings, generate  # noqa: E402


def load_digits(device: str) -> tuple[MAR, str]:
    """The trained digits model if its checkpoint exists, else the same architecture with random weights."""
    try:
        from lazymar.checkpoint import load_model
        return load_model("digits", device=device), "trained"
    except (ValueError, FileNotFoundError):
        model = random_mar(get_config("digits"), 0, randomise="none", sampling_defaults=RANDOM_MODEL_SAMPLING)
        return model.to(device), "random (data/checkpoints/digits.pth missing)"


def run_once(model: MAR, labels: list[int], settings: SamplingSettings, recorded: bool, seed: int = 0) -> float:
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    if recorded:
        with RedundancyRecorder(model, model_name="digits") as rec:
            generate(model, labels, settings, seed=seed)
        rec.to_dataset()
    else:
        generate(model, labels, settings, seed=seed)
    sync()
    return time.perf_counter() - start


def bound_bytes(model: MAR, batch: int, settings: SamplingSettings) -> dict[str, int]:
    """What the recorder holds at most (float32): the previous step's features, the stash of this step's features
    not yet turned into statistics, the head stash, and the output arrays of one batch."""
    from lazymar.orders import generation_order  # noqa: PLC0415
    from lazymar.recording.recorder import HEAD_CHUNK, LAYER_CHUNK  # noqa: PLC0415
    c = model.config
    P, S, cfg = model.buffer_size + model.seq_len, settings.num_iter, settings.cfg != 1.0
    branches = 2 if cfg else 1
    blocks = [c.encoder_embed_dim] * c.encoder_depth + [c.decoder_embed_dim] * c.decoder_depth
    # previous step, per layer: unit vectors of the cond rows (B), with CFG also the raw [cond; uncond] (2B) and
    # the unit residual (B); K and V: unit vectors of the cond rows (2 x B)
    output_rows = 4 * batch if cfg else batch
    previous = sum(output_rows * P * w + 2 * batch * P * w for w in blocks) + output_rows * P * c.decoder_embed_dim
    # stash: references keeping up to LAYER_CHUNK block outputs (w) and qkv outputs (3w) alive, all branches
    stash = min(LAYER_CHUNK, max(c.encoder_depth, c.decoder_depth)) * branches * batch * P * 4 * max(blocks)
    # head: up to HEAD_CHUNK head steps of K + 2 tensors (input, K res-block outputs, final output) of 2n rows,
    # n the most tokens decoded at one MAR step
    order, unknown, most = generation_order(settings.order), model.seq_len, 0
    for step in range(S):
        masked = order.mask_length(step, S, model.seq_len, unknown) if step < S - 1 else 0
        most, unknown = max(most, unknown - masked), masked
    head = min(HEAD_CHUNK, model.diffloss.gen_diffusion.num_timesteps) * (c.diffloss_d + 2) * branches * batch \
        * most * c.diffloss_w
    L, T, H = len(blocks) + 1, model.diffloss.gen_diffusion.num_timesteps, c.diffloss_d + 1
    floats = batch * S * (L * 3 * P + L * 4 * P + T * H)  # token_cosine, the 4 CFG statistics, head_change
    return {"features": 4 * (previous + stash + head), "outputs": 4 * floats + batch * S * P}  # + int8 status


def child(args: argparse.Namespace) -> None:
    """Measure one generation's peak memory growth in this fresh process; prints JSON."""
    torch.set_num_threads(args.threads)
    model, _ = load_digits(args.device)
    settings = model.sampling_defaults
    labels = [i % 10 for i in range(args.batch_size)]
    run_once(model, labels, settings, recorded=False)  # warm up: allocator pools, lazily initialised kernels
    cuda = args.device.startswith("cuda")
    with PeakMemory(torch.device(args.device), cpu_baseline_mb=resident_mb()) as peak:  # CPU: growth of the RSS
        run_once(model, labels, settings, recorded=args.child == "recorded")
    peak_bytes = round(peak.peak_mb * 2**20)
    print(json.dumps({"rss_growth_bytes": None if cuda else peak_bytes, "cuda_peak_bytes": peak_bytes if cuda else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=("plain", "recorded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    model, weights = load_digits(args.device)
    settings = model.sampling_defaults
    labels = [i % 10 for i in range(args.batch_size)]
    run_once(model, labels[:2], SamplingSettings(num_iter=2, cfg=settings.cfg), recorded=True)  # warm up
    plain, recorded = [], []
    for _ in range(args.repeats):
        plain.append(run_once(model, labels, settings, recorded=False))
        recorded.append(run_once(model, labels, settings, recorded=True))
    with RedundancyRecorder(model, model_name="digits") as rec:
        generate(model, labels, settings, seed=0)
    ds = rec.to_dataset()
    out = Path("/tmp") / f"recording_overhead_{int(time.time())}.nc"
    start = time.perf_counter()
    save_stats(ds, out)
    save_seconds = time.perf_counter() - start
    file_bytes = out.stat().st_size
    out.unlink()

    memory = {}
    for mode in ("plain", "recorded"):
        cmd = [sys.executable, __file__, "--child", mode, "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--device", args.device]
        memory[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if args.device.startswith("cuda"):
        added = memory["recorded"]["cuda_peak_bytes"] - memory["plain"]["cuda_peak_bytes"]
    else:
        added = memory["recorded"]["rss_growth_bytes"] - memory["plain"]["rss_growth_bytes"]
    bound = bound_bytes(model, args.batch_size, settings)
    median_plain, median_recorded = statistics.median(plain), statistics.median(recorded)
    print(json.dumps({
        "model": "digits", "weights": weights, "device": args.device, "threads": args.threads,
        "batch_size": args.batch_size, "num_iter": settings.num_iter, "cfg": settings.cfg,
        "head_steps": model.diffloss.gen_diffusion.num_timesteps, "repeats": args.repeats,
        "seconds_plain": plain, "seconds_recorded": recorded,
        "median_seconds_plain": median_plain, "median_seconds_recorded": median_recorded,
        "overhead_fraction": median_recorded / median_plain - 1.0,
        "save_seconds": save_seconds, "file_bytes_per_batch": file_bytes,
        "peak_memory_added_bytes": added, "peak_memory_measure": "cuda max_memory_allocated" if
        args.device.startswith("cuda") else "peak RSS growth during one generation in a fresh process, recorded - plain",
        "bound_bytes": bound["features"] + bound["outputs"], "bound_detail": bound,
    }, indent=2))


if __name__ == "__main__":
    main()
