"""Our modules have exactly the official key and shape lists (so official checkpoints load unchanged)."""
import re
from pathlib import Path

import pytest
import torch

from conftest import reference_dir
from lazymar import MAR, get_config
from lazymar.checkpoint import infer_config
from lazymar.vae import AutoencoderKL, VAEConfig, infer_vae_config


def read_shapes(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """The (key, shape) list of a reference file: tab-separated key and shape, '#' lines are comments."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(n) for n in re.findall(r"\d+", shape))))
    return rows


def header_counts(path: Path) -> tuple[int, int]:
    """The '<n> tensors, <m> numbers' stated in the file's comment line."""
    match = re.search(r"(\d+) tensors, (\d+) numbers", path.read_text().splitlines()[0])
    assert match, f"no tensor count in the header of {path}"
    return int(match.group(1)), int(match.group(2))


def state_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def reference(name: str) -> Path:
    path = reference_dir() / f"{name}_state_dict_shapes.txt"
    if not path.is_file():
        pytest.fail(f"missing reference file {path} (set LAZYMAR_REFERENCE_DIR)")
    return path


def test_reference_files_parse_completely():
    for name in ("mar_base", "mar_large", "mar_huge", "kl16_vae"):
        rows = read_shapes(reference(name))
        tensors, numbers = header_counts(reference(name))
        assert len(rows) == tensors, name
        assert sum(torch.Size(shape).numel() for _, shape in rows) == numbers, name


@pytest.mark.parametrize("name", ["mar_base", "mar_large", "mar_huge"])
def test_official_mar_sizes_match_reference(name):
    with torch.device("meta"):
        model = MAR(get_config(name))
    assert state_shapes(model) == read_shapes(reference(name))


def test_kl16_vae_matches_reference():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    assert state_shapes(vae) == read_shapes(reference("kl16_vae"))


@pytest.mark.parametrize("name", ["mar_base", "mar_large", "mar_huge"])
def test_official_shapes_infer_the_named_architecture(name):
    """Head counts leave no trace in the shapes (MAR-H has head size 80): the named configuration supplies them."""
    state = {k: torch.empty(shape, device="meta") for k, shape in read_shapes(reference(name))}
    config, matched = infer_config(state)
    assert matched == name
    assert config == get_config(name)


def test_kl16_shapes_infer_the_default_vae_config():
    state = {k: torch.empty(shape, device="meta") for k, shape in read_shapes(reference("kl16_vae"))}
    assert infer_vae_config(state) == VAEConfig()
