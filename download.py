"""Fetch the flower_photos data set and the ImageNet-21k ViT-B/16 weights, safely.

Downloads go to a temporary file beside the destination and are renamed into place only
once complete (length) and verified (sha256 prefix), so an interrupted run never leaves a
file that looks finished. Archives are extracted into a temporary folder, checked
member by member for path traversal, and moved into place only when whole.

Usage:
    python download.py flowers [--dest DIR] [--url URL]
    python download.py weights [--format pth|npz] [--output PATH] [--url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from tqdm import tqdm

from cli import run_main
from errors import DownloadError, UserError, check_output_file, write_error

FLOWERS_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
)
FLOWERS_DIR = "flower_photos"  # the folder the archive unpacks to
FLOWERS_ARCHIVE = f"{FLOWERS_DIR}.tgz"  # the archive's local name while it is unpacked
# The published archive: 3670 JPEGs in five class folders (plus a LICENSE.txt).
FLOWER_CLASS_COUNTS = {
    "daisy": 633,
    "dandelion": 898,
    "roses": 641,
    "sunflowers": 699,
    "tulips": 799,
}
# The archive holds JPEGs only, so its check counts those (my_dataset.IMG_EXTENSIONS is what
# training reads, a wider set).
FLOWER_IMAGE_SUFFIXES = {".jpg", ".jpeg"}
# timm's in21k ViT-B/16 file under the name the reproduced repository's train.py expects.
WEIGHTS_FILE = "vit_base_patch16_224_in21k.pth"


class WeightsSource(NamedTuple):
    url: str
    filename: str  # default local file name
    hash_prefix: str | None  # leading hex digits of the file's sha256, when published


WEIGHTS = {
    # timm's conversion of Google's in21k checkpoint; the reproduced repository renames it.
    "pth": WeightsSource(
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
        "jx_vit_base_patch16_224_in21k-e5005f0a.pth",
        WEIGHTS_FILE,
        "e5005f0a",
    ),
    "npz": WeightsSource(
        "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz", "ViT-B_16.npz", None
    ),
}

_TIMEOUT_S = 60  # seconds without a byte from the server before giving up
# torch.hub's convention: "name-<sha256 prefix>.ext" carries its own hash prefix.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")
# tarfile's own traversal filter (Python >= 3.11.4 / 3.10.12) as a second line of defence;
# the explicit member check in safe_extract_tar does not rely on it.
_TAR_FILTER: str | None = "data" if hasattr(tarfile, "data_filter") else None
_TAR_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


def _fetch(url: str, out: BinaryIO, progress: bool, desc: str) -> tuple[int, int | None, str]:
    """Stream ``url`` into ``out``; return (bytes read, Content-Length or None, sha256)."""
    request = urllib.request.Request(url, headers={"User-Agent": "vit-flowers/download.py"})
    sha256, size = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        with tqdm(
            total=expected,
            disable=not progress,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
        ) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                sha256.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    return size, expected, sha256.hexdigest()


def download_file(
    url: str,
    dst: Path,
    hash_prefix: str | None = None,
    progress: bool = True,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``dst``, checking its length and, when given, its sha256 prefix.

    ``check``, when given, is called on the downloaded file before it takes ``dst``'s name and
    raises DownloadError for content that is not what was asked for.

    The bytes go to a temporary file in ``dst``'s folder that is renamed to ``dst`` only once
    complete and verified; on failure it is removed and an existing ``dst`` is left untouched.
    This is what ``torch.hub.download_url_to_file`` does, plus the length check it lacks:
    there, a connection closed early leaves a short file in place without any error.
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            size, expected, digest = _fetch(url, f, progress, dst.name)
        if expected is not None and size != expected:
            raise DownloadError(
                f"The download of {url} stopped after {size} of {expected} bytes and was "
                f"discarded; run the command again."
            )
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise DownloadError(
                f"The file downloaded from {url} has sha256 {digest[:16]}..., not "
                f"{hash_prefix}..., and was discarded; check that the URL points to the "
                f"expected file."
            )
        if check is not None:
            check(tmp)
        os.replace(tmp, dst)
    except urllib.error.HTTPError as e:
        raise DownloadError(
            f"Downloading {url} failed with HTTP {e.code} {e.reason}; check the URL."
        ) from None
    except urllib.error.URLError as e:
        raise DownloadError(
            f"Could not reach {url} ({e.reason}); check your network connection or pass "
            f"--url with a reachable mirror."
        ) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise DownloadError(
            f"The connection broke while downloading {url} ({e!r}); run the command again."
        ) from None
    except ValueError as e:  # urllib: unknown url type
        raise DownloadError(f"{url!r} is not a valid URL ({e}); pass an http(s) URL.") from None
    except OSError as e:
        raise write_error(dst, e) from None
    finally:
        # A cleanup that fails too (the folder is gone or is a file) must not hide the error.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return dst


def _outside(name: str) -> bool:
    """True if a tar path, taken relative to the extraction folder, escapes it."""
    norm = posixpath.normpath(name)
    absolute = name.startswith(("/", "\\")) or os.path.isabs(name)
    return absolute or norm == ".." or norm.startswith("../")


def _check_members(members: list[tarfile.TarInfo]) -> None:
    """Refuse members that would write outside the extraction folder.

    Checked on names alone, before anything is written: absolute paths, ``..`` escapes, link
    targets outside, special files, and any path or link target that goes through a symlink
    of the archive (which would make a check on names meaningless).
    """
    symlinks = {posixpath.normpath(m.name) for m in members if m.issym()}

    def through_symlink(path: str, include_self: bool) -> bool:
        parts = posixpath.normpath(path).split("/")
        stop = len(parts) + 1 if include_self else len(parts)
        return any("/".join(parts[:i]) in symlinks for i in range(1, stop))

    for m in members:
        if _outside(m.name):
            raise _unsafe(m, "would be written outside the destination")
        if through_symlink(m.name, include_self=False):
            raise _unsafe(m, "would be written through a symlink")
        if m.issym() or m.islnk():
            # Symlink targets are relative to the link's folder, hard-link targets to the root.
            base = posixpath.dirname(posixpath.normpath(m.name)) if m.issym() else ""
            target = posixpath.join(base, m.linkname)
            if _outside(target):
                raise _unsafe(m, f"links to {m.linkname!r}, outside the destination")
            if through_symlink(target, include_self=True):
                raise _unsafe(m, "links through another symlink")
        elif not (m.isfile() or m.isdir()):
            raise _unsafe(m, "is a device, fifo or other special file")


def _unsafe(member: tarfile.TarInfo, why: str) -> DownloadError:
    return DownloadError(
        f"Refusing to extract the archive: member {member.name!r} {why}; the archive is "
        f"unsafe, do not use it."
    )


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a .tar/.tgz into ``dest`` refusing path traversal; all or nothing.

    Every member is checked before anything is written; the archive is extracted into a
    temporary folder inside ``dest`` and its top-level entries are renamed into ``dest`` only
    when extraction succeeded. Existing entries of ``dest`` are never overwritten.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()  # reads to the end: truncation shows up here
                _check_members(members)
                extra = {"filter": _TAR_FILTER} if _TAR_FILTER else {}
                tf.extractall(tmp, members=members, **extra)
        except _TAR_FILTER_ERRORS as e:  # only if tarfile is stricter than our check
            raise DownloadError(
                f"Refusing to extract {archive}: {e}; the archive is unsafe, do not use it."
            ) from None
        except (tarfile.TarError, EOFError, zlib.error) as e:
            reason = str(e).splitlines()[0].rstrip(":")  # tarfile lists every codec it tried
            raise DownloadError(
                f"{archive} is corrupt or truncated ({reason}); download it again."
            ) from None
        except OSError as e:
            raise DownloadError(
                f"Could not extract {archive} into {dest} ({e}); check the folder and free "
                f"disk space."
            ) from None
        entries = sorted(tmp.iterdir())
        for entry in entries:
            if (dest / entry.name).exists() or (dest / entry.name).is_symlink():
                raise DownloadError(
                    f"{dest / entry.name} already exists; move it away or extract {archive} "
                    f"somewhere else."
                )
        for entry in entries:
            os.replace(entry, dest / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_images(root: Path) -> dict[str, int]:
    """Number of .jpg/.jpeg files (any case) in each class folder of ``root``, by class name."""
    return {
        d.name: sum(
            1 for f in d.iterdir() if f.is_file() and f.suffix.lower() in FLOWER_IMAGE_SUFFIXES
        )
        for d in sorted(Path(root).iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def _first_difference(counts: dict[str, int], expected: dict[str, int]) -> str | None:
    for name in sorted(counts.keys() | expected.keys()):
        have, want = counts.get(name), expected.get(name)
        if have != want:
            if want is None:
                return f"it has an unexpected class folder {name!r}"
            if have is None:
                return f"class {name!r} is missing"
            return f"class {name!r} has {have} images, expected {want}"
    return None


def check_flowers(root: Path, expected: dict[str, int] = FLOWER_CLASS_COUNTS) -> dict[str, int]:
    """Count images per class folder of ``root`` and check them against ``expected``."""
    root = Path(root)
    if not root.is_dir():
        raise DownloadError(
            f"{root} is not a folder; run `python download.py flowers` to fetch the data set."
        )
    counts = count_images(root)
    diff = _first_difference(counts, expected)
    if diff is not None:
        raise DownloadError(
            f"{root} is not the expected flower_photos: {diff}; delete it and run "
            f"`python download.py flowers` again."
        )
    return counts


def download_flowers(
    dest: Path = Path("."),
    url: str = FLOWERS_URL,
    expected: dict[str, int] = FLOWER_CLASS_COUNTS,
    *,
    progress: bool = True,
) -> Path:
    """Return ``dest/flower_photos``, downloading, extracting and checking it if absent.

    An existing folder is checked, never replaced: if its counts are wrong this raises and
    leaves the deletion to the user. On any failure nothing new is left in ``dest``.
    """
    dest = Path(dest)
    root = dest / FLOWERS_DIR
    if root.exists():
        check_flowers(root, expected)
        return root
    archive = download_file(url, dest / FLOWERS_ARCHIVE, progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FLOWERS_DIR}-", dir=dest))
    try:
        safe_extract_tar(archive, tmp)
        extracted = tmp / FLOWERS_DIR
        if not extracted.is_dir():
            raise DownloadError(
                f"The archive from {url} has no flower_photos folder; check the URL."
            )
        diff = _first_difference(count_images(extracted), expected)
        if diff is not None:
            raise DownloadError(
                f"The archive from {url} is not the expected flower_photos: {diff}; check the URL."
            )
        os.replace(extracted, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_path(fmt: str = "pth", dst: Path | None = None) -> Path:
    """Where ``download_weights`` writes: ``dst`` (a file, or a folder) or the usual name here."""
    if dst is None:
        return Path(WEIGHTS[fmt].filename)
    return Path(dst) / WEIGHTS[fmt].filename if Path(dst).is_dir() else Path(dst)


def download_weights(
    fmt: str = "pth", dst: Path | None = None, url: str | None = None, *, progress: bool = True
) -> Path:
    """Fetch the ImageNet-21k ViT-B/16 weights as timm's ``.pth`` or Google's ``.npz``.

    The sha256 prefix checked is the one in the URL's file name (torch.hub's ``name-<hash>.ext``
    convention), else the one published for ``fmt``. An existing ``dst`` is not downloaded
    again, but is checked against that prefix.
    """
    from weights import is_npz_file  # here: it imports torch, which `flowers` does not need

    if fmt not in WEIGHTS:
        raise DownloadError(f"Unknown weights format {fmt!r}; choose one of {sorted(WEIGHTS)}.")
    source = WEIGHTS[fmt]
    url = url or source.url
    dst = weights_path(fmt, dst)
    match = _HASH_IN_NAME.search(url.rsplit("/", 1)[-1])
    hash_prefix = match.group(1) if match else source.hash_prefix
    # Google's .npz has no published hash: its content is checked instead (an error page
    # served as 200 would otherwise be saved as the weights).
    check_npz = hash_prefix is None
    if dst.exists():
        if check_npz and not is_npz_file(dst):
            raise DownloadError(
                f"{dst} exists but is not a .npz archive; delete it or choose another --output."
            )
        if hash_prefix is not None and not _sha256(dst).startswith(hash_prefix):
            raise DownloadError(
                f"{dst} exists but its sha256 does not start with {hash_prefix}; delete it or "
                f"choose another --output."
            )
        return dst

    def npz_only(path: Path) -> None:
        if not is_npz_file(path):
            raise DownloadError(
                f"The file downloaded from {url} is not a .npz archive of arrays (an error "
                f"page?) and was discarded; check that the URL points to the weights."
            )

    return download_file(url, dst, hash_prefix, progress=progress,
                         check=npz_only if check_npz else None)



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    flowers = sub.add_parser("flowers", help="fetch and check TensorFlow's flower_photos")
    flowers.add_argument("--dest", type=Path, default=Path("."), help="folder to put it in")
    flowers.add_argument("--url", default=FLOWERS_URL, help="archive URL (for mirrors)")
    weights = sub.add_parser("weights", help="fetch the ImageNet-21k ViT-B/16 weights")
    weights.add_argument(
        "--format",
        choices=sorted(WEIGHTS),
        default="pth",
        help="pth: timm's conversion, sha256-checked (default); npz: Google's original",
    )
    weights.add_argument(
        "--output",
        type=Path,
        default=None,
        help="file or existing folder to write to (default: the file's usual name, here)",
    )
    weights.add_argument("--url", default=None, help="weights URL (for mirrors)")
    return parser


def run(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty()  # keep logs free of progress-bar redraws
    if args.command == "flowers":
        archive = args.dest / FLOWERS_ARCHIVE
        if archive.is_dir():
            # check_output_file would name the archive as if the user had passed it.
            raise UserError(f"{archive} is a folder in the way of the download; move it or "
                            f"pick another --dest.")
        check_output_file(archive, "--dest")
        existed = (args.dest / FLOWERS_DIR).exists()
        root = download_flowers(args.dest, args.url, progress=progress)
        counts = check_flowers(root)
        state = "already present" if existed else "ready"
        print(
            f"flower_photos {state} at {root}: {sum(counts.values())} images in "
            f"{len(counts)} classes."
        )
    else:
        dst = check_output_file(weights_path(args.format, args.output), "--output")
        existed = dst.exists()
        path = download_weights(args.format, dst, args.url, progress=progress)
        state = "already present" if existed else "saved"
        size_mb = path.stat().st_size / 2**20
        print(f"ViT-B/16 in21k weights ({args.format}) {state} at {path} ({size_mb:.1f} MiB).")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
