"""--device: every command takes cpu, cuda and cuda:K; a device that is not there is one line (exit 2) before any
model is loaded; and a plain ``cuda`` is resolved to an indexed device (torch.cuda.set_device needs one)."""
from __future__ import annotations

import pytest
import torch

from lazymar import checkpoint, distributed
from lazymar.cli import main

COMMANDS = {  # the smallest argument list of each command that takes --device
    "sample": [], "eval": [], "bench": [], "record": ["--out", "r.zarr"], "sweep": ["--no-defaults"],
    "derive": ["--stats", "s.nc", "--target-flops-ratio", "2"], "search-quality": [],
}


def missing_devices() -> list[str]:
    """Devices this machine does not have (whatever it has): a GPU index past the last, cuda/mps if absent."""
    out = [f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 5}", "tpu:3"]
    if not torch.cuda.is_available():
        out.append("cuda")
    if not torch.backends.mps.is_available():
        out.append("mps")
    return out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", missing_devices())
def test_a_missing_device_is_one_line_before_any_model_loads(command, device, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def late(*args, **kwargs):
        raise AssertionError("the device was checked too late: a model was being loaded")
    monkeypatch.setattr(checkpoint, "load_model", late)
    monkeypatch.setattr("lazymar.commands.common.load_model", late)
    assert main([command, *COMMANDS[command], "--device", device]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err
    assert lines[0].startswith(f"lazymar {command}: error: argument --device: ")
    if device == "cuda":
        assert "no CUDA device" in lines[0]
    if device.startswith("cuda:"):
        assert ("no CUDA device" in lines[0]) if not torch.cuda.is_available() else (device[5:] in lines[0])
    if device == "tpu:3":
        assert "not a torch device" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the target of this machine: no GPU")
def test_eval_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["eval", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_cuda_is_resolved_to_the_current_index(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with distributed.launched("cuda") as device:
        assert device == torch.device("cuda", torch.cuda.current_device())
    with distributed.launched(f"cuda:{torch.cuda.device_count() - 1}") as device:
        assert device.index == torch.cuda.device_count() - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_commands_run_on_cuda(device, tmp_path, capsys):
    small = ["--model", "digits", "--num-iter", "4", "--device", device]
    assert main(["sample", *small, "--labels", "0-1", "--per-label", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["eval", *small, "--num-samples", "10", "--batch-size", "5", "--json"]) == 0
    assert main(["bench", *small, "--num-samples", "4", "--batch-size", "4", "--repeats", "1", "--json"]) == 0
    assert main(["record", *small, "--num-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "r.nc"),
                 "--no-progress"]) == 0
    assert main(["sweep", *small, "--no-defaults", "--schedule", "lazymar", "--num-samples", "4", "--batch-size",
                 "4", "--json"]) == 0


def test_eval_help_names_what_it_reports_for_each_model_kind(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "accuracy and digits-FID for the embedded digits models" in text
    assert "FID and Inception Score for ImageNet (VAE) models" in text
