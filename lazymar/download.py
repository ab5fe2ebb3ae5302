"""The official MAR weights and FID statistics, one command away (``lazymar download NAME``), and found by name later.

Files land in the cache folder ``$LAZYMAR_HOME`` (default: the user's cache, e.g. ``~/.cache/lazymar``) under the
official repository's layout (``pretrained_models/mar/mar_base/checkpoint-last.pth``, ...), so that a MAR checkout can
serve as the cache too. pooch places each file atomically; the transfer itself resumes a partial ``.part`` file with
an HTTP Range request and shows a tqdm bar. The official files publish no hash, so the size and sha256 of each file
are recorded in ``downloads.json`` beside them at its first download and checked afterwards: a later download must
give the same bytes, and a file whose size or contents changed since is refused with one line naming it.

``$LAZYMAR_DOWNLOAD_URL`` (or ``lazymar download --url``) replaces the official addresses by ``BASE/<layout path>``:
a mirror, or the tests' local HTTP server.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import LazymarError

REGISTRY = "downloads.json"
CHUNK = 1 << 20  # bytes read at a time for hashing
STREAM_CHUNK = 1 << 16  # bytes written at a time while downloading: at most this much is lost when a transfer breaks


@dataclass(frozen=True)
class OfficialFile:
    """A released file: its name on our command line, what it is, where it lives in the official layout, and the
    address MAR's ``util/download.py`` fetches it from (Dropbox: ``dl=1`` asks for the file itself)."""

    name: str
    kind: str  # "model", "vae" or "fid-stats": the option that takes it (--model, --vae, --fid-stats)
    path: str
    url: str
    approx_mb: int  # the size MAR's downloader announces


OFFICIAL: dict[str, OfficialFile] = {f.name: f for f in (
    OfficialFile("mar_base", "model", "pretrained_models/mar/mar_base/checkpoint-last.pth",
                 "https://www.dropbox.com/scl/fi/f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth"
                 "?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=1", 1587),
    OfficialFile("mar_large", "model", "pretrained_models/mar/mar_large/checkpoint-last.pth",
                 "https://www.dropbox.com/scl/fi/pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth"
                 "?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=1", 3650),
    OfficialFile("mar_huge", "model", "pretrained_models/mar/mar_huge/checkpoint-last.pth",
                 "https://www.dropbox.com/scl/fi/1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth"
                 "?rlkey=4lae281yzxb406atp32vzc83o&dl=1", 7191),
    OfficialFile("kl16", "vae", "pretrained_models/vae/kl16.ckpt",
                 "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt"
                 "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1", 254),
    # the ADM reference statistics that MAR's evaluation scores against, committed in its repository
    OfficialFile("fid-stats", "fid-stats", "fid_stats/adm_in256_stats.npz",
                 "https://raw.githubusercontent.com/LTH14/mar/main/fid_stats/adm_in256_stats.npz", 0),
)}
OPTION = {"model": "--model", "vae": "--vae", "fid-stats": "--fid-stats"}
WHAT = {"model": "a MAR checkpoint", "vae": "the KL-16 VAE", "fid-stats": "the FID reference statistics"}


class DownloadError(LazymarError):
    """A file that cannot be fetched, is not fetched yet, or differs from what was recorded; one line."""


def home() -> Path:
    """The cache folder: ``$LAZYMAR_HOME``, else the user's cache directory for lazymar."""
    if os.environ.get("LAZYMAR_HOME"):
        return Path(os.environ["LAZYMAR_HOME"]).expanduser()
    import pooch
    return Path(pooch.os_cache("lazymar"))


def local_path(name: str) -> Path:
    return home() / OFFICIAL[name].path


def source_url(name: str, base: Optional[str] = None) -> str:
    """Where ``name`` is fetched from: ``BASE/<layout path>`` with a base URL (argument or
    ``$LAZYMAR_DOWNLOAD_URL``), else the official address."""
    base = base or os.environ.get("LAZYMAR_DOWNLOAD_URL")
    file = OFFICIAL[name]
    return f"{base.rstrip('/')}/{file.path}" if base else file.url


# --- the registry of sizes and hashes -------------------------------------------------------------------------
def read_registry() -> dict[str, Any]:
    path = home() / REGISTRY
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        raise DownloadError(f"unreadable download registry {path}: delete it to record the files again") from None


def _record(name: str, entry: Optional[dict[str, Any]]) -> None:
    """Write (or with None remove) one file's entry; atomic, so that a reader never sees half a file."""
    files = read_registry()
    if entry is None:
        files.pop(OFFICIAL[name].path, None)
    else:
        files[OFFICIAL[name].path] = entry
    path = home() / REGISTRY
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{REGISTRY}.", delete=False) as f:
        json.dump({"version": 1, "files": files}, f, indent=2, sort_keys=True)
    os.replace(f.name, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(name: str, path: Path, digest: str, url: str) -> dict[str, Any]:
    st = path.stat()
    return {"name": name, "size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns, "url": url,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check(name: str, full: bool = False) -> Optional[dict[str, Any]]:
    """The registry entry of the downloaded ``name`` after checking the file against it (None: no entry, as for a
    file put there by hand). Size always; the sha256 when ``full`` or when the file was touched since it was last
    hashed (its mtime changed). DownloadError, one line naming the file, when either differs."""
    path, entry = local_path(name), read_registry().get(OFFICIAL[name].path)
    if entry is None:
        return None
    size = path.stat().st_size
    if size != entry["size"]:
        raise DownloadError(f"corrupted download: {path} has {size} bytes, but {entry['size']} were recorded at its "
                            f"first download (`lazymar download {name} --force` fetches it again)")
    if full or path.stat().st_mtime_ns != entry.get("mtime_ns"):
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise DownloadError(f"corrupted download: {path} has sha256 {digest[:16]}..., but "
                                f"{entry['sha256'][:16]}... was recorded at its first download (`lazymar download "
                                f"{name} --force` fetches it again)")
        if path.stat().st_mtime_ns != entry.get("mtime_ns"):
            entry = {**entry, "mtime_ns": path.stat().st_mtime_ns}
            try:
                _record(name, entry)  # only a hint that spares the next check the hashing
            except OSError:
                pass
    return entry


# --- fetching -------------------------------------------------------------------------------------------------
class ResumingDownloader:
    """A pooch downloader that continues ``part`` (kept across runs) with a Range request, shows a tqdm bar, and
    hands the complete file to pooch, which moves it into place."""

    def __init__(self, part: Path, desc: str, progress: bool = True, timeout: float = 60.0):
        self.part, self.desc, self.progress, self.timeout = part, desc, progress, timeout

    def __call__(self, url: str, output_file: str, pooch: Any = None) -> None:
        import requests
        from tqdm.auto import tqdm
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if have and response.status_code == 416:  # nothing after `have`: the part may be complete already
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) == have:
                    os.replace(self.part, output_file)
                    return
                self.part.unlink()
                return self(url, output_file, pooch)
            response.raise_for_status()
            resumed = have if response.status_code == 206 else 0  # a 200 sends the whole file again
            length = response.headers.get("Content-Length")
            total = resumed + int(length) if length and length.isdigit() else None
            with open(self.part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=resumed, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=self.desc, disable=not self.progress) as bar:
                for chunk in response.iter_content(chunk_size=STREAM_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = self.part.stat().st_size
        if total is not None and got != total:
            raise DownloadError(f"download of {self.desc} stopped at {got} of {total} bytes; run the same command "
                                "again to resume")
        os.replace(self.part, output_file)


def download(name: str, base_url: Optional[str] = None, force: bool = False, progress: bool = True
             ) -> tuple[Path, str]:
    """Fetch ``name`` into the cache unless it is there, and check it; returns its path and what happened
    ("downloaded", "verified", or "recorded" for a file found there without an entry).

    ``force`` forgets the file and its entry first. A download whose bytes differ from those recorded at the first
    one is refused (DownloadError) and not kept.
    """
    if name not in OFFICIAL:
        raise DownloadError(f"unknown file {name!r}; known: {', '.join(OFFICIAL)}")
    path, url = local_path(name), source_url(name, base_url)
    part = path.with_name(path.name + ".part")
    if force:
        path.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        _record(name, None)
    if path.is_file():
        if check(name, full=True) is not None:
            return path, "verified"
        _record(name, _entry(name, path, sha256(path), url))
        return path, "recorded"
    import pooch
    import requests
    recorded = read_registry().get(OFFICIAL[name].path)
    path.parent.mkdir(parents=True, exist_ok=True)
    downloader = ResumingDownloader(part, name, progress)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # pooch's "Downloading ..." and "SHA256 hash ..." notes: we say it ourselves
    try:
        pooch.retrieve(url, known_hash=f"sha256:{recorded['sha256']}" if recorded else None, fname=path.name,
                       path=path.parent, downloader=downloader, progressbar=progress)
    except requests.RequestException as err:
        raise DownloadError(f"cannot download {name} from {url} ({_reason(err)})"
                            + ("; run the same command again to resume" if part.exists() else "")) from None
    except LazymarError:  # a transfer that stopped short
        raise
    except ValueError as err:  # pooch: the hash differs from the recorded one (the file is not kept)
        if recorded is None:
            raise DownloadError(f"cannot download {name} from {url} ({' '.join(str(err).split())})") from None
        raise DownloadError(f"{name} from {url} differs from the file recorded at its first download (sha256 "
                            f"{recorded['sha256'][:16]}..., {recorded['size']} bytes); `--force` accepts the new "
                            "one") from None
    finally:
        logger.setLevel(level)
    official = OFFICIAL[name]
    size = path.stat().st_size
    if url == official.url and size < 0.9 * official.approx_mb * 2**20:  # e.g. a web page instead of the file
        path.unlink()
        raise DownloadError(f"{name} from {url} is {size} bytes, not about {official.approx_mb} MB: not the official "
                            "file (has the address moved? --url fetches from a mirror)")
    _record(name, _entry(name, path, recorded["sha256"] if recorded else sha256(path), url))
    return path, "downloaded"


def _reason(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    text = " ".join(str(err).split())
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)  # the socket's own words, e.g. "Connection refused"
    return f"{type(err).__name__}: {errno.group(1).strip() if errno else text[:160]}"


# --- finding downloaded files by name -------------------------------------------------------------------------
def resolve(name_or_path: str | Path, kind: str) -> Path:
    """The file that ``--model`` / ``--vae`` / ``--fid-stats`` names: a downloaded file by its name (checked against
    the registry), anything else as a path. One line when the name is of another kind or not downloaded yet."""
    name = str(name_or_path)
    file = OFFICIAL.get(name)
    if file is None:
        return Path(name_or_path)
    if file.kind != kind:
        raise DownloadError(f"{name} is {WHAT[file.kind]}, not {WHAT[kind]}: pass it as {OPTION[file.kind]} {name}")
    path = local_path(name)
    if not path.is_file():
        raise DownloadError(f"{name} is not downloaded yet (looked for {path}): `lazymar download {name}` fetches it")
    check(name)
    return path


def status() -> list[dict[str, Any]]:
    """Each official file: name, kind, path, whether it is downloaded, its recorded size and sha256."""
    files = read_registry()
    rows = []
    for name, file in OFFICIAL.items():
        path, entry = local_path(name), files.get(file.path) or {}
        rows.append({"name": name, "kind": file.kind, "path": str(path), "downloaded": path.is_file(),
                     "partial_bytes": path.with_name(path.name + ".part").stat().st_size
                     if path.with_name(path.name + ".part").exists() else 0,
                     "size": entry.get("size"), "sha256": entry.get("sha256")})
    return rows
