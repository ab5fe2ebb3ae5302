"""--preset mar-paper|lazymar-paper: the published evaluation settings of MAR-B/L/H, applied under explicit options."""
import argparse

import pytest
import torch

from lazymar import MAR, get_config
from lazymar.cli import main
from lazymar.commands.common import add_sampling_args, sampling_from_args
from lazymar.config import SamplingSettings
from lazymar.errors import SettingsError

# the numbers as the two projects publish them: MAR's README evaluation commands, LazyMAR's eval.py and README
PUBLISHED = {
    ("mar-paper", "mar_base"): (256, 2.9), ("mar-paper", "mar_large"): (256, 3.0),
    ("mar-paper", "mar_huge"): (256, 3.2),
    ("lazymar-paper", "mar_base"): (64, 3.25), ("lazymar-paper", "mar_large"): (64, 3.25),
    ("lazymar-paper", "mar_huge"): (64, 3.25),
}


def official(arch: str, **changes) -> MAR:
    """An official-size MAR without memory (meta tensors): sampling_from_args reads only its configuration."""
    with torch.device("meta"):
        return MAR(get_config(arch, **changes))


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def models() -> dict[str, MAR]:
    return {arch: official(arch) for arch in ("mar_base", "mar_large", "mar_huge")}


@pytest.mark.parametrize("preset, arch", sorted(PUBLISHED))
def test_preset_gives_the_published_settings(models, preset, arch):
    num_iter, cfg = PUBLISHED[preset, arch]
    settings = sampling_from_args(models[arch], parsed("--preset", preset))
    assert settings == SamplingSettings(num_iter=num_iter, cfg=cfg, cfg_schedule="linear", temperature=1.0)
    assert models[arch].diffloss.gen_diffusion.num_timesteps == 100  # both papers' head steps


def test_without_a_preset_the_checkpoint_settings_stay(models):
    model = models["mar_base"]
    stored = SamplingSettings(num_iter=32, cfg=1.5, cfg_schedule="constant", temperature=0.9)
    model.sampling_defaults = stored
    try:
        assert sampling_from_args(model, parsed()) == stored
        assert sampling_from_args(model, parsed("--preset", "mar-paper")).num_iter == 256
    finally:
        model.sampling_defaults = SamplingSettings()


def test_explicit_options_override_the_preset(models):
    settings = sampling_from_args(models["mar_huge"], parsed("--preset", "mar-paper", "--num-iter", "64", "--cfg",
                                                             "4", "--temperature", "0.95"))
    assert settings == SamplingSettings(num_iter=64, cfg=4.0, cfg_schedule="linear", temperature=0.95)
    settings = sampling_from_args(models["mar_large"], parsed("--preset", "lazymar-paper", "--cfg-schedule",
                                                              "constant"))
    assert settings == SamplingSettings(num_iter=64, cfg=3.25, cfg_schedule="constant", temperature=1.0)


def test_the_model_name_picks_the_settings(models):
    """A loaded checkpoint names its architecture (model.arch); without one, the configuration decides."""
    model = models["mar_base"]
    model.arch = "mar_huge"
    try:
        assert sampling_from_args(model, parsed("--preset", "mar-paper")).cfg == 3.2
    finally:
        del model.arch
    assert sampling_from_args(model, parsed("--preset", "mar-paper")).cfg == 2.9


def test_a_head_with_other_steps_is_refused():
    with pytest.raises(SettingsError, match="mar-paper preset samples with 100 diffusion-head steps.*takes 50"):
        sampling_from_args(official("mar_base", num_sampling_steps="50"), parsed("--preset", "mar-paper"))


def test_a_preset_on_another_model_is_refused_in_one_line(capsys, monkeypatch):
    import lazymar.sampling as sampling
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    for model in ("digits", "digits16"):
        assert main(["sample", "--model", model, "--preset", "lazymar-paper"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("lazymar sample: error:")
        assert "lazymar-paper preset holds the published settings of mar_base, mar_large, mar_huge only" in err
        assert f"this model is {model}" in err
    with pytest.raises(SettingsError, match="this model is none of them"):
        sampling_from_args(official("mar_base", buffer_size=32), parsed("--preset", "mar-paper"))


def test_an_unknown_preset_is_one_line(capsys):
    assert main(["eval", "--preset", "mar-best"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "argument --preset: invalid choice: 'mar-best'" in err and "mar-paper" in err


def test_presets_reach_every_sampling_command(capsys):
    for command in ("sample", "eval", "bench", "record"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--preset {mar-paper,lazymar-paper}" in capsys.readouterr().out
