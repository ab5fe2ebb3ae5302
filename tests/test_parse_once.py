"""Parse once: every command-line value is parsed into a typed value by its argparse type, and the package works
on that value without reading the text again (the head steps of a whole generation, a schedule file of a whole
recording)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lazymar.head_steps as head_steps_module
from lazymar.cache.schedule_file import NO_CACHE, ScheduleChoice
from lazymar.cli import build_parser
from lazymar.config import SamplingSettings
from lazymar.errors import SettingsError
from lazymar.grid import Labels
from lazymar.head_steps import FrequencyWeightedSteps, HeadSteps
from lazymar.recording.dataset import COMPACT_BITS, KeepBits


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_argparse_types_return_typed_values(tmp_path):
    args = parse("sample", "--labels", "0-2,7", "--head-steps", "fts:0.5:25", "--device", "cpu")
    assert isinstance(args.labels, Labels) and list(args.labels) == [0, 1, 2, 7] and str(args.labels) == "0-2,7"
    assert isinstance(args.head_steps, HeadSteps) and args.head_steps.allocation == FrequencyWeightedSteps(0.5, 25)
    assert args.device == torch.device("cpu")
    assert args.schedule is NO_CACHE  # the default "none", parsed like any other value
    assert list(parse("sample").labels) == list(range(10))  # defaults are parsed too
    args = parse("record", "--out", str(tmp_path / "r.zarr"), "--keep-bits", "compact", "--schedule", "lazymar")
    assert isinstance(args.keep_bits, KeepBits) and args.keep_bits.bits == COMPACT_BITS
    assert isinstance(args.schedule, ScheduleChoice) and not args.schedule.is_file


def test_settings_hold_parsed_head_steps_and_copies_keep_them():
    settings = SamplingSettings(head_steps="fts:0.25:50")
    assert isinstance(settings.head_steps, HeadSteps) and settings.head_steps == "fts:0.25:50"
    assert settings.to_dict()["head_steps"] == "fts:0.25:50" and type(settings.to_dict()["head_steps"]) is str
    for copied in (copy.deepcopy(settings), pickle.loads(pickle.dumps(settings))):
        assert copied == settings and copied.head_steps.allocation == FrequencyWeightedSteps(0.25, 50)
    labels = Labels("3-5")
    assert copy.deepcopy(labels) == (3, 4, 5) and pickle.loads(pickle.dumps(labels)).text == "3-5"
    with pytest.raises(SettingsError, match="fewer than the model's 40 head steps"):
        settings.check_for(seq_len=64, head_steps=40)
    with pytest.raises(SettingsError, match=r"num_iter 65 exceeds the model's 64 tokens.*\[1, 64\]"):
        SamplingSettings(num_iter=65).check_for(seq_len=64, head_steps=100)


def test_a_generation_parses_its_head_steps_once(monkeypatch):
    from builders import tiny_mar
    from lazymar.sampling import generate
    model = tiny_mar(num_sampling_steps="4", randomise="none")
    settings = SamplingSettings(num_iter=4, cfg=2.0, head_steps="fts:0.5:2")
    calls = []
    original = head_steps_module.head_step_allocation
    monkeypatch.setattr(head_steps_module, "head_step_allocation", lambda spec: calls.append(spec) or original(spec))
    generate(model, [0, 1], settings, seed=0)
    generate(model, [0, 1], settings, seed=1)
    assert calls == []  # parsed when the settings were made, never per batch
