"""Our MAR reproduces the official implementation's outputs stored in every *_io.pt fixture (on the device
$LAZYMAR_TEST_DEVICE, default cpu: benchmarks/gpu_check.py runs this module on CUDA)."""
import os
from pathlib import Path

import pytest
import torch

from conftest import reference_dir
from lazymar import MAR, MARConfig

FIXTURES = sorted(reference_dir().glob("*_io.pt"))
DEVICE = torch.device(os.environ.get("LAZYMAR_TEST_DEVICE", "cpu"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def load_pair(io_path: Path) -> tuple[MAR, dict]:
    ckpt_path = io_path.with_name(io_path.name.replace("_io.pt", ".pth"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = MAR(MARConfig.from_dict(ckpt["args"])).eval()
    model.load_state_dict(ckpt["model_ema"], strict=True)
    io = torch.load(io_path, map_location="cpu", weights_only=False)
    return model.to(DEVICE), {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in io.items()}


def test_fixtures_present():
    assert FIXTURES, f"no *_io.pt fixtures in {reference_dir()} (set LAZYMAR_REFERENCE_DIR)"


@pytest.mark.parametrize("io_path", FIXTURES, ids=lambda p: p.stem)
@torch.no_grad()
def test_reproduces_reference_outputs(io_path: Path):
    model, io = load_pair(io_path)
    labels, tokens = io["labels"], io["tokens"]
    B = labels.shape[0]
    class_embedding = torch.cat([model.class_embedding(labels, B), model.class_embedding(None, B)])
    mask_keys = sorted(k for k in io if k.startswith("mask_"))
    assert mask_keys
    for key in mask_keys:
        n = key.removeprefix("mask_")
        mask = torch.cat([io[key], io[key]])
        encoded = model.forward_mae_encoder(torch.cat([tokens, tokens]), mask, class_embedding)
        z = model.forward_mae_decoder(encoded, mask)
        assert rel_err(encoded, io[f"encoder_out_{n}"]) <= 1e-5, key
        assert rel_err(z, io[f"z_{n}"]) <= 1e-5, key

    net = model.diffloss.net
    assert rel_err(net(io["head_x"], io["head_t"], io["head_c"]), io["head_out"]) <= 1e-5
    cfg_out = net.forward_with_cfg(io["cfg_x"], io["cfg_t"], io["cfg_c"], float(io["cfg_scale"]))
    assert rel_err(cfg_out, io["cfg_out"]) <= 1e-5

    gen = model.diffloss.gen_diffusion
    assert torch.equal(gen.timestep_map.to(DEVICE), io["gen_timestep_map"])
    assert rel_err(torch.from_numpy(gen.betas).to(DEVICE), io["gen_betas"]) <= 1e-5
    assert rel_err(torch.from_numpy(model.diffloss.train_diffusion.betas).to(DEVICE), io["train_betas"]) <= 1e-5

    pmv_indices = sorted({int(k.split("_")[1]) for k in io if k.startswith("pmv_") and k != "pmv_note"})
    assert pmv_indices
    for i in pmv_indices:
        t = torch.full((io["head_x"].shape[0],), i, device=DEVICE)
        out = gen.p_mean_variance(model.diffloss.denoiser(None)(io["head_x"], t, io["head_c"]), io["head_x"], t)
        for name in ("mean", "log_variance", "pred_xstart"):
            assert rel_err(out[name], io[f"pmv_{i}_{name}"]) <= 1e-5, (i, name)
