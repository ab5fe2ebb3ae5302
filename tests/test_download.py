"""`lazymar download` against a local HTTP server that serves small stand-ins under the official names: a fresh
download, a resume, corrupted files refused, offline with and without the cache, and the options finding the
downloaded files by name. Nothing here reaches the internet."""
import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import tiny_vae
from conftest import reference_dir
from lazymar import download as dl
from lazymar.checkpoint import load_model, read_checkpoint
from lazymar.cli import main
from lazymar.errors import LazymarError
from lazymar.vae import load_vae

FIXTURE = reference_dir() / "mar_tiny_a.pth"  # a small MAR in the official layout, served as mar_base
pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason="mar_tiny_a.pth fixture not available")


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 with Range support (``bytes=N-``), logging each request's
    path, Range header and body size; ``cut`` sends only that many bytes of the next response and hangs up."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.ranges, self.cut, self.log = dict(files), ranges, None, []
        self.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self):
        data = self.server.files.get(self.path)
        wanted = self.headers.get("Range")
        if data is None:
            self.server.log.append((self.path, wanted, 0))
            self.send_error(404)
            return
        start = 0
        if wanted and self.server.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                self.server.log.append((self.path, wanted, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut is not None:
            body, self.server.cut = body[:self.server.cut], None
            self.close_connection = True
        self.wfile.write(body)
        self.server.log.append((self.path, wanted, len(body)))

    def log_message(self, *args):  # quiet
        pass


MAR_BASE = "/" + dl.OFFICIAL["mar_base"].path
KL16 = "/" + dl.OFFICIAL["kl16"].path
FID_STATS = "/" + dl.OFFICIAL["fid-stats"].path


@pytest.fixture
def served(tmp_path):
    vae_file = tmp_path / "vae.ckpt"
    torch.save({"model": tiny_vae(z_channels=16, ch_mult=(1, 2), ch=32, norm_groups=32).state_dict()}, vae_file)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    files = {MAR_BASE: FIXTURE.read_bytes(), KL16: vae_file.read_bytes(),
             FID_STATS: (tmp_path / "stats.npz").read_bytes()}
    server = FileServer(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch, served):
    """An empty cache folder, with downloads from the local server (never through a proxy)."""
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(variable, "127.0.0.1,localhost")
    monkeypatch.setenv("LAZYMAR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LAZYMAR_DOWNLOAD_URL", served.url)
    return tmp_path / "home"


def offline(monkeypatch) -> None:
    """Downloads from a port where nothing listens."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LAZYMAR_DOWNLOAD_URL", f"http://127.0.0.1:{port}")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


def registry(home: Path) -> dict:
    return json.loads((home / dl.REGISTRY).read_text())["files"]


def assert_one_error_line(err: str, command: str, *needles: str) -> None:
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lazymar {command}: error:"), err
    for needle in needles:
        assert needle in err, err


# --- fetching -------------------------------------------------------------------------------------------------
def test_fresh_download_records_size_and_hash_and_loads_by_name(home, served, capsys):
    code, out, err = run(capsys, "download", "mar_base", "--no-progress")
    assert code == 0, err
    path = home / "pretrained_models/mar/mar_base/checkpoint-last.pth"
    data = served.files[MAR_BASE]
    assert path.read_bytes() == data
    assert not path.with_name(path.name + ".part").exists()
    assert registry(home)[dl.OFFICIAL["mar_base"].path]["size"] == len(data)
    assert registry(home)[dl.OFFICIAL["mar_base"].path]["sha256"] == hashlib.sha256(data).hexdigest()
    assert out.startswith(f"mar_base: downloaded {path}")
    assert served.log == [(MAR_BASE, None, len(data))]

    by_name, by_path = load_model("mar_base"), load_model(FIXTURE)
    assert by_name.config == by_path.config
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), k

    code, out, _ = run(capsys, "download", "mar_base", "--no-progress")  # again: checked, not fetched
    assert code == 0 and out.startswith(f"mar_base: verified {path}")
    assert len(served.log) == 1


def test_interrupted_download_resumes_with_a_range_request(home, served, capsys):
    data = served.files[MAR_BASE]
    served.cut = len(data) // 3
    code, _, err = run(capsys, "download", "mar_base", "--no-progress")
    assert code == 2
    assert_one_error_line(err, "download", "cannot download mar_base", "run the same command again to resume")
    path = home / dl.OFFICIAL["mar_base"].path
    part = path.with_name(path.name + ".part")
    kept = part.read_bytes()  # what arrived, up to the last whole chunk
    assert not path.exists() and 0 < len(kept) <= len(data) // 3 and kept == data[:len(kept)]

    code, _, err = run(capsys, "download", "mar_base", "--no-progress")
    assert code == 0, err
    assert path.read_bytes() == data and not part.exists()
    # the second request asked only for the rest, and got only the rest
    assert served.log[-1] == (MAR_BASE, f"bytes={len(kept)}-", len(data) - len(kept))
    assert registry(home)[dl.OFFICIAL["mar_base"].path]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_server_without_ranges_sends_the_whole_file_again(home, served, capsys):
    served.ranges = False
    path = home / dl.OFFICIAL["kl16"].path
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".part").write_bytes(b"junk that is not the file's beginning")
    assert run(capsys, "download", "kl16", "--no-progress")[0] == 0
    assert path.read_bytes() == served.files[KL16]


def test_a_complete_part_file_is_finished_without_fetching_bytes(home, served, capsys):
    path = home / dl.OFFICIAL["fid-stats"].path
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".part").write_bytes(served.files[FID_STATS])
    assert run(capsys, "download", "fid-stats", "--no-progress")[0] == 0
    assert path.read_bytes() == served.files[FID_STATS]
    assert served.log == [(FID_STATS, f"bytes={len(served.files[FID_STATS])}-", 0)]  # a 416: nothing left


def test_missing_file_on_the_server_is_one_line(home, served, capsys):
    del served.files[KL16]
    code, _, err = run(capsys, "download", "kl16", "--no-progress")
    assert code == 2
    assert_one_error_line(err, "download", "cannot download kl16", "HTTP 404")


# --- corrupted files --------------------------------------------------------------------------------------------
def test_corrupted_file_is_refused_in_one_line_naming_it(home, served, capsys):
    assert run(capsys, "download", "mar_base", "--no-progress")[0] == 0
    path = home / dl.OFFICIAL["mar_base"].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    for argv in (("download", "mar_base", "--no-progress"),
                 ("sample", "--model", "mar_base", "--num-iter", "2", "--out", str(home / "x.png"))):
        code, _, err = run(capsys, *argv)
        assert code == 2
        assert_one_error_line(err, argv[0], f"corrupted download: {path}", "sha256", "--force")
    with pytest.raises(LazymarError, match="corrupted download"):
        load_model("mar_base")

    path.write_bytes(bytes(data[:-10]))  # truncated
    code, _, err = run(capsys, "sample", "--model", "mar_base", "--num-iter", "2", "--out", str(home / "x.png"))
    assert code == 2
    assert_one_error_line(err, "sample", f"{path} has {len(data) - 10} bytes, but {len(data)} were recorded")

    assert run(capsys, "download", "mar_base", "--force", "--no-progress")[0] == 0  # fetched again
    assert path.read_bytes() == served.files[MAR_BASE]
    load_model("mar_base")


def test_a_download_that_differs_from_the_first_is_refused_and_not_kept(home, served, capsys):
    assert run(capsys, "download", "kl16", "--no-progress")[0] == 0
    path = home / dl.OFFICIAL["kl16"].path
    path.unlink()
    served.files[KL16] = served.files[KL16][:-1] + bytes([served.files[KL16][-1] ^ 1])
    code, _, err = run(capsys, "download", "kl16", "--no-progress")
    assert code == 2
    assert_one_error_line(err, "download", "kl16", "differs from the file recorded at its first download", "--force")
    assert not path.exists() and not list(path.parent.glob("tmp*"))
    assert run(capsys, "download", "kl16", "--force", "--no-progress")[0] == 0  # accept the new one
    assert path.read_bytes() == served.files[KL16]


def test_a_file_put_in_the_cache_by_hand_is_recorded_then_checked(home, served, capsys):
    path = home / dl.OFFICIAL["mar_base"].path
    path.parent.mkdir(parents=True)
    path.write_bytes(FIXTURE.read_bytes())
    load_model("mar_base")  # no record yet: used as it is
    code, out, _ = run(capsys, "download", "mar_base", "--no-progress")
    assert code == 0 and out.startswith("mar_base: recorded") and served.log == []
    assert registry(home)[dl.OFFICIAL["mar_base"].path]["sha256"] == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()


# --- offline ----------------------------------------------------------------------------------------------------
def test_offline_with_the_cache_works(home, served, capsys, monkeypatch):
    assert run(capsys, "download", "mar_base", "kl16", "--no-progress")[0] == 0
    offline(monkeypatch)
    code, out, err = run(capsys, "download", "mar_base", "kl16", "--no-progress")
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [["mar_base:", "verified"], ["kl16:", "verified"]]
    code, _, err = run(capsys, "sample", "--model", "mar_base", "--vae", "kl16", "--labels", "0,1", "--per-label",
                       "1", "--num-iter", "2", "--out", str(home / "s.png"))
    assert code == 0, err
    assert (home / "s.png").is_file()


def test_offline_without_the_cache_says_what_to_do_in_one_line(home, capsys, monkeypatch):
    offline(monkeypatch)
    code, _, err = run(capsys, "download", "mar_base", "--no-progress")
    assert code == 2
    assert_one_error_line(err, "download", "cannot download mar_base from http://127.0.0.1:", "Connection refused")
    for argv in (("sample", "--model", "mar_base"), ("sample", "--model", "digits16", "--vae", "kl16"),
                 ("eval", "--model", "digits", "--vae", "kl16")):
        code, _, err = run(capsys, *argv)
        assert code == 2
        name = argv[argv.index("--vae") + 1] if "--vae" in argv else "mar_base"
        assert_one_error_line(err, argv[0], f"{name} is not downloaded yet", f"`lazymar download {name}` fetches it")


def test_url_option_overrides_the_address(home, served, capsys, monkeypatch):
    offline(monkeypatch)
    code, _, err = run(capsys, "download", "kl16", "--url", served.url + "/", "--no-progress")
    assert code == 0, err
    assert (home / dl.OFFICIAL["kl16"].path).read_bytes() == served.files[KL16]


# --- names ------------------------------------------------------------------------------------------------------
def test_names_resolve_to_downloaded_files_of_their_kind(home, served, capsys, monkeypatch):
    assert run(capsys, "download", "mar_base", "kl16", "fid-stats", "--no-progress", "--json")[0] == 0
    vae = load_vae("kl16")
    for (k, a), (_, b) in zip(vae.state_dict().items(), load_vae(home / dl.OFFICIAL["kl16"].path).state_dict().items()):
        assert torch.equal(a, b), k
    assert dl.resolve("fid-stats", "fid-stats") == home / dl.OFFICIAL["fid-stats"].path
    assert dl.resolve("some/file.pth", "model") == Path("some/file.pth")  # anything else is a path

    code, _, err = run(capsys, "sample", "--model", "kl16")
    assert code == 2
    assert_one_error_line(err, "sample", "kl16 is the KL-16 VAE, not a MAR checkpoint: pass it as --vae kl16")
    code, _, err = run(capsys, "sample", "--model", "mar_base", "--vae", "mar_base")
    assert_one_error_line(err, "sample", "mar_base is a MAR checkpoint, not the KL-16 VAE: pass it as --model")

    # --fid-stats by name: the statistics load (before Inception, which fails here without torch-fidelity)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    code, _, err = run(capsys, "eval", "--model", "mar_base", "--vae", "kl16", "--fid-stats", "fid-stats",
                       "--num-samples", "2")
    assert code == 2
    assert_one_error_line(err, "eval", "torch-fidelity")
    (home / dl.OFFICIAL["fid-stats"].path).unlink()
    code, _, err = run(capsys, "eval", "--model", "mar_base", "--vae", "kl16", "--fid-stats", "fid-stats")
    assert_one_error_line(err, "eval", "fid-stats is not downloaded yet", "`lazymar download fid-stats`")


def test_listing_shows_what_is_there(home, served, capsys):
    assert run(capsys, "download", "kl16", "--no-progress")[0] == 0
    code, out, _ = run(capsys, "download", "--json")
    listing = json.loads(out)
    assert code == 0 and listing["home"] == str(home)
    rows = {r["name"]: r for r in listing["files"]}
    assert set(rows) == {"mar_base", "mar_large", "mar_huge", "kl16", "fid-stats"}
    assert rows["kl16"]["downloaded"] and rows["kl16"]["size"] == len(served.files[KL16])
    assert not rows["mar_huge"]["downloaded"] and rows["mar_huge"]["size"] is None


def test_a_small_answer_from_the_official_address_is_not_taken_for_the_file(home, served, capsys, monkeypatch):
    """The official files have known sizes: a page of a few KB where 254 MB are due is refused, not recorded."""
    from dataclasses import replace
    monkeypatch.delenv("LAZYMAR_DOWNLOAD_URL")
    monkeypatch.setitem(dl.OFFICIAL, "kl16", replace(dl.OFFICIAL["kl16"], url=served.url + KL16))
    code, _, err = run(capsys, "download", "kl16", "--no-progress")
    assert code == 2
    assert_one_error_line(err, "download", f"kl16 from {served.url + KL16} is {len(served.files[KL16])} bytes, not "
                                           "about 254 MB")
    assert not (home / dl.OFFICIAL["kl16"].path).exists() and dl.read_registry() == {}


def test_default_home_and_official_addresses(monkeypatch):
    monkeypatch.delenv("LAZYMAR_HOME", raising=False)
    monkeypatch.delenv("LAZYMAR_DOWNLOAD_URL", raising=False)
    assert dl.home().name == "lazymar"
    assert dl.source_url("mar_huge").startswith("https://www.dropbox.com/")
    assert dl.source_url("kl16", "http://mirror/x/") == "http://mirror/x/pretrained_models/vae/kl16.ckpt"


# --- memory-mapped loading --------------------------------------------------------------------------------------
def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_zip_checkpoints_are_memory_mapped_and_legacy_ones_still_load(tmp_path):
    zipped, legacy = tmp_path / "zipped.pth", tmp_path / "legacy.pth"
    state = {"w": torch.arange(6.0)}
    torch.save({"model": state}, zipped)
    torch.save({"model": state}, legacy, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(zipped)
    assert str(zipped) in mapped_files()  # the tensors stay in the file
    assert torch.equal(ckpt["model"]["w"], state["w"])
    ckpt = read_checkpoint(legacy)
    assert str(legacy) not in mapped_files()
    assert torch.equal(ckpt["model"]["w"], state["w"])
