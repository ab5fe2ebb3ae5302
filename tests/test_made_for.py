"""Inputs that know their model: schedule files and recordings name the model they were made for, and using one
with another model is refused in one line naming both; a damaged store or file is one line naming it, whatever
the damage (seeded random truncation, garbled bytes, deleted files of a small valid store)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from builders import tiny_mar
from lazymar.cache.schedule_file import NO_CACHE, ScheduleChoice, ScheduleError, load_schedule, read_schedule_file
from lazymar.cli import main
from lazymar.config import get_config
from lazymar.errors import LazymarError
from lazymar.fingerprint import ModelFingerprint, ModelMismatchError
from lazymar.recording import RecordingError, load_stats, save_stats
from lazymar.recording.driver import record
from lazymar.sampling import SamplingSettings

DATA = Path(__file__).parents[1] / "data"
SCHEDULES = sorted((DATA / "schedules").glob("*.json"))

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# --- schedules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SCHEDULES, ids=lambda p: p.name)
def test_committed_schedules_name_their_model(path):
    made_for = read_schedule_file(path).made_for
    model = "digits16" if path.name.startswith("digits16_") else "digits"
    assert made_for == ModelFingerprint.of(get_config(model)) and made_for.model == model
    load_schedule(str(path), 64, get_config(model))  # fits its own model
    other = get_config("digits" if model == "digits16" else "digits16")
    with pytest.raises(ModelMismatchError, match=f"made for {model} .* but") as err:
        load_schedule(str(path), 64, other)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_presets_fit_any_model():
    for name in ("lazymar", "lazymar-released", "lazymar-new-tokens"):
        for model in ("digits", "digits16", "mar_base"):
            assert load_schedule(name, 64, get_config(model)).made_for is None


def test_a_schedule_round_trips_its_fingerprint(tmp_path):
    schedule = load_schedule("lazymar", 8, get_config("digits16")).with_changes(
        made_for=ModelFingerprint.of(get_config("digits16")))
    path = schedule.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["made_for"]["positions"] == 320
    assert read_schedule_file(path).made_for == schedule.made_for
    data = json.loads(path.read_text())
    data["made_for"] = "any"  # explicitly portable
    path.write_text(json.dumps(data))
    assert load_schedule(str(path), 8, get_config("digits")).made_for is None
    for bad in ({"positions": 3}, [1], {**schedule.made_for.to_dict(), "positions": "many"}):
        path.write_text(json.dumps({**data, "made_for": bad}))
        with pytest.raises(ScheduleError, match="made_for") as err:
            read_schedule_file(path)
        assert str(path) in str(err.value)


def test_a_file_is_read_once_and_none_is_one_value(tmp_path):
    path = load_schedule("lazymar", 4, get_config("digits")).save(tmp_path / "s.json")
    choice = ScheduleChoice.parse(str(path))
    path.unlink()  # parsed already: resolving it needs no file
    assert choice.resolve(4, get_config("digits")).name == "lazymar"
    assert ScheduleChoice.parse("none") is NO_CACHE and NO_CACHE.sampler_schedule(4) is None
    assert ScheduleChoice.parse("lazymar").sampler_schedule(4).name == "lazymar"


def test_sample_refuses_a_schedule_made_for_another_model(capsys, tmp_path):
    schedule = DATA / "schedules" / "digits16_3.6x.json"
    out = tmp_path / "s.png"
    assert main(["sample", "--model", "digits", "--schedule", str(schedule), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"{schedule} was made for digits16 (320 positions" in err
    assert "but digits (128 positions" in err and not out.exists()


# --- recordings ---------------------------------------------------------------------------------------------
def test_derive_refuses_a_recording_of_another_model(capsys, tmp_path):
    out = tmp_path / "d.json"
    stats = DATA / "stats" / "digits16.zarr"
    assert main(["derive", "--model", "digits", "--stats", str(stats), "--tau-token", "0.5", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"recording {stats} was made for digits16 (320 positions" in err and "--model digits (128 positions" in err
    assert not out.exists()


def test_derive_writes_the_recording_s_model_into_the_schedule(capsys, tmp_path):
    out = tmp_path / "d.json"
    assert main(["derive", "--stats", str(DATA / "stats" / "digits.nc"), "--tau-token", "0.5", "--out",
                 str(out), "--json"]) == 0
    assert read_schedule_file(out).made_for == ModelFingerprint.of(get_config("digits"))


# --- damaged stores -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """A valid 3-sample Zarr recording of a 4x4-token model, in batches of 2, and the same as a NetCDF file."""
    model = tiny_mar(img_size=64, num_sampling_steps="4", randomise="head", std=0.1)
    path = tmp_path_factory.mktemp("store") / "small.zarr"
    record(model, path, num_samples=3, settings=SamplingSettings(num_iter=3, cfg=2.0), seed=1, batch_size=2,
           progress=False)
    save_stats(load_stats(path, lazy=False), path.with_suffix(".nc"))
    return path


def damage(path: Path, rng: random.Random) -> str:
    """Truncate, garble or delete one random file of the store (or the file) at ``path``; returns what was done."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    victim = rng.choice(files)
    data = victim.read_bytes()
    how = rng.choice(("truncate", "garble", "delete"))
    if how == "truncate":
        victim.write_bytes(data[:rng.randrange(max(len(data), 1))])
    elif how == "delete":
        victim.unlink()
    else:
        garbled = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if garbled:
                garbled[rng.randrange(len(garbled))] = rng.randrange(256)
        victim.write_bytes(bytes(garbled))
    return f"{how} {victim.relative_to(path) if path.is_dir() else victim.name}"


@pytest.mark.parametrize("suffix, seed", [(".zarr", 0), (".zarr", 1), (".zarr", 2), (".nc", 3)])
def test_a_damaged_store_loads_or_is_one_recording_error(small_store, tmp_path, suffix, seed):
    rng = random.Random(seed)
    outcomes = set()
    source = small_store.with_suffix(suffix)
    for i in range(20):
        copy = tmp_path / f"damaged{i}{suffix}"
        shutil.copytree(source, copy) if source.is_dir() else shutil.copyfile(source, copy)
        what = damage(copy, rng)
        for lazy in (False, True):
            try:
                ds = load_stats(copy, lazy=lazy)
                ds.load()  # every chunk read: a lazily opened store's damage surfaces here
                outcomes.add("loaded")
            except RecordingError as err:  # the project's own error: one line naming the store
                assert str(copy) in str(err) and "\n" not in str(err), what
                outcomes.add("refused")
            except Exception as err:  # a lazily read chunk raises the library's error, checked below
                assert lazy, f"{what}: {type(err).__name__}: {err}"
                from lazymar.recording.dataset import reading
                with pytest.raises(RecordingError, match=str(copy)):
                    with reading(copy):
                        load_stats(copy, lazy=True).load()
                outcomes.add("refused")
        shutil.rmtree(copy) if copy.is_dir() else copy.unlink(missing_ok=True)
    assert "refused" in outcomes  # the damage was real


def test_the_cli_names_a_damaged_store(small_store, tmp_path, capsys):
    copy = tmp_path / "bad.zarr"
    shutil.copytree(small_store, copy)
    (copy / "zarr.json").write_text("{ not json")
    assert main(["derive", "--stats", str(copy), "--tau-token", "0.5"]) == 2
    err = one_line_error(capsys)
    assert str(copy) in err and "Traceback" not in err
    assert isinstance(RecordingError("x"), LazymarError)


def test_sweep_refuses_a_recording_of_another_model(capsys, tmp_path):
    stats = DATA / "stats" / "digits16.zarr"
    assert main(["sweep", "--model", "digits", "--stats", str(stats), "--no-defaults", "--schedule", "lazymar",
                 "--num-samples", "1", "--out", str(tmp_path / "s.csv")]) == 2
    err = one_line_error(capsys)
    assert f"recording {stats} was made for digits16" in err and "--model digits (128 positions" in err


def test_merge_stats_names_a_damaged_input(small_store, tmp_path, capsys):
    copy = tmp_path / "bad.zarr"
    shutil.copytree(small_store, copy)
    chunk = next(p for p in sorted((copy / "token_cosine").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:5])  # truncated: read only when the merge computes
    assert main(["merge-stats", str(tmp_path / "m.nc"), str(copy)]) == 2
    err = one_line_error(capsys)
    assert str(copy) in err and not (tmp_path / "m.nc").exists()
