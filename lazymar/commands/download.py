"""`lazymar download`: the official MAR weights, the KL-16 VAE and the FID reference statistics (lazymar.download)."""
from __future__ import annotations

import argparse

from .. import download as dl
from .common import print_json


def _size(n: int | None) -> str:
    if n is None:
        return "size not recorded"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _official_name(text: str) -> str:
    if text not in dl.OFFICIAL:
        raise argparse.ArgumentTypeError(f"unknown file {text!r}; known: {', '.join(dl.OFFICIAL)}")
    return text


def cmd_download(args: argparse.Namespace) -> int:
    if not args.names:  # what is there
        rows = dl.status()
        if args.json:
            print_json({"home": str(dl.home()), "files": rows})
            return 0
        print(f"cache: {dl.home()} (LAZYMAR_HOME)")
        for r in rows:
            state = (f"downloaded, {_size(r['size'])}" if r["downloaded"] else
                     f"partial, {_size(r['partial_bytes'])}" if r["partial_bytes"] else "not downloaded")
            print(f"  {r['name']:<10} {state:<28} {r['path']}")
        return 0
    done = []
    for name in dict.fromkeys(args.names):
        path, what = dl.download(name, base_url=args.url, force=args.force, progress=not args.no_progress)
        entry = dl.read_registry().get(dl.OFFICIAL[name].path, {})
        done.append({"name": name, "path": str(path), "status": what, "size": entry.get("size"),
                     "sha256": entry.get("sha256")})
        if not args.json:
            print(f"{name}: {what} {path} ({_size(entry.get('size'))}, sha256 {entry.get('sha256', '?')[:16]}...)")
    if args.json:
        print_json(done)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    names = ", ".join(f"{f.name} ({dl.OPTION[f.kind]})" for f in dl.OFFICIAL.values())
    p = sub.add_parser(
        "download", help="fetch the official MAR-B/L/H weights, the KL-16 VAE and the FID statistics",
        description=f"Fetch official files into the cache folder $LAZYMAR_HOME (default: the user cache, e.g. "
                    f"~/.cache/lazymar), resuming a partial download, and check them against the size and sha256 "
                    f"recorded at their first download. Afterwards the options take them by name: {names}. "
                    f"Without names: list what is there.")
    p.add_argument("names", nargs="*", type=_official_name, metavar="NAME",
                   help=f"one or more of: {', '.join(dl.OFFICIAL)}")
    p.add_argument("--url", default=None, metavar="BASE",
                   help="fetch BASE/<official layout path> instead of the official address (a mirror); "
                        "default $LAZYMAR_DOWNLOAD_URL, else the official one")
    p.add_argument("--force", action="store_true",
                   help="fetch again, forgetting the file, any partial download and the recorded hash")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_download)
