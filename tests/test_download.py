"""download.py against a local HTTP server on 127.0.0.1: real archives, real files, no network."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import Server
from PIL import Image

import download
from download import (
    FLOWER_CLASS_COUNTS,
    DownloadError,
    check_flowers,
    download_file,
    download_flowers,
    download_weights,
    main,
    safe_extract_tar,
)

SMALL_COUNTS = {"daisy": 3, "roses": 2}


# --- fixtures -------------------------------------------------------------------------------


# The local server (server, Server) and no_proxies live in conftest.py; every test here keeps
# urllib away from proxies, the server's and the refused or cut-short connections' alike.
pytestmark = pytest.mark.usefixtures("no_proxies")


@pytest.fixture
def closed_port_url() -> str:
    """A URL on a port nothing listens on (bound, then released), so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/flower_photos.tgz"


@pytest.fixture
def short_body_url():
    """A one-shot server that announces 100000 bytes, sends 10 and closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/ViT-B_16.npz"
    finally:
        listener.close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def make_tgz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def flower_members(counts: dict[str, int], jpeg: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """flower_photos/<class>/*.jpg with ``counts`` images, some with .JPG/.jpeg suffixes."""
    members = [_dir("flower_photos"), _file("flower_photos/LICENSE.txt", b"CC-BY\n")]
    for cls, n in counts.items():
        members.append(_dir(f"flower_photos/{cls}"))
        suffixes = [".jpg", ".JPG", ".jpeg"]
        members += [_file(f"flower_photos/{cls}/{i:04d}{suffixes[i % 3]}", jpeg) for i in range(n)]
    return members


@pytest.fixture(scope="module")
def flowers_tgz(jpeg: bytes) -> bytes:
    """An archive laid out like the real one, with the real class counts (3670 images)."""
    return make_tgz(flower_members(FLOWER_CLASS_COUNTS, jpeg))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- flowers --------------------------------------------------------------------------------


def test_cli_flowers_downloads_extracts_checks_and_cleans_up(
    server: Server, flowers_tgz: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.publish("flower_photos.tgz", flowers_tgz)
    dest = tmp_path / "data"

    assert main(["flowers", "--dest", str(dest), "--url", url]) == 0

    root = dest / "flower_photos"
    assert leftovers(dest) == ["flower_photos"]  # the .tgz and the temporary folders are gone
    assert (root / "LICENSE.txt").read_bytes() == b"CC-BY\n"
    for cls, n in FLOWER_CLASS_COUNTS.items():
        assert len(list((root / cls).iterdir())) == n
    assert check_flowers(root) == FLOWER_CLASS_COUNTS
    out = capsys.readouterr()
    assert "3670 images in 5 classes" in out.out
    assert out.err == ""
    assert server.requests == ["/flower_photos.tgz"]


def test_existing_good_flowers_are_not_downloaded_again(
    server: Server, flowers_tgz: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.publish("flower_photos.tgz", flowers_tgz)
    dest = tmp_path / "data"
    root = download_flowers(dest, url, progress=False)
    assert server.requests == ["/flower_photos.tgz"]
    server.requests.clear()

    assert main(["flowers", "--dest", str(dest), "--url", url]) == 0
    assert download_flowers(dest, url, progress=False) == root
    assert server.requests == []
    assert "already present" in capsys.readouterr().out


def test_download_flowers_with_smaller_expected_counts(
    server: Server, jpeg: bytes, tmp_path: Path
) -> None:
    url = server.publish("small.tgz", make_tgz(flower_members(SMALL_COUNTS, jpeg)))
    root = download_flowers(tmp_path / "data", url, expected=SMALL_COUNTS, progress=False)
    assert root == tmp_path / "data" / "flower_photos"
    assert check_flowers(root, SMALL_COUNTS) == SMALL_COUNTS
    assert leftovers(tmp_path / "data") == ["flower_photos"]


def test_existing_flowers_with_wrong_counts_are_reported_not_replaced(
    server: Server, jpeg: bytes, tmp_path: Path
) -> None:
    url = server.publish("small.tgz", make_tgz(flower_members(SMALL_COUNTS, jpeg)))
    root = download_flowers(tmp_path, url, expected=SMALL_COUNTS, progress=False)
    (root / "roses" / "0000.jpg").unlink()
    server.requests.clear()

    with pytest.raises(DownloadError, match="class 'roses' has 1 images, expected 2"):
        download_flowers(tmp_path, url, expected=SMALL_COUNTS, progress=False)
    assert server.requests == []
    assert len(list((root / "daisy").iterdir())) == 3  # the user's folder is left alone


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive_fails_cleanly_and_leaves_nothing(
    server: Server,
    flowers_tgz: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    data = flowers_tgz[: len(flowers_tgz) // 2] if damage == "truncated" else b"not a tar" * 99
    url = server.publish("flower_photos.tgz", data)
    dest = tmp_path / "data"

    assert main(["flowers", "--dest", str(dest), "--url", url]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "corrupt or truncated" in err and "Traceback" not in err
    assert leftovers(dest) == []  # no flower_photos, no .tgz, no temporary folders


def test_archive_with_wrong_class_counts_is_rejected(
    server: Server, jpeg: bytes, tmp_path: Path
) -> None:
    url = server.publish("flower_photos.tgz", make_tgz(flower_members({"daisy": 3}, jpeg)))
    dest = tmp_path / "data"

    with pytest.raises(DownloadError, match=f"{url} .* class 'roses' is missing; check the URL"):
        download_flowers(dest, url, expected=SMALL_COUNTS, progress=False)
    assert leftovers(dest) == []


def test_check_flowers_counts_jpegs_case_insensitively_and_names_the_first_difference(
    tmp_path: Path, jpeg: bytes
) -> None:
    for name in ["a.jpg", "b.JPG", "c.jpeg", "d.JPEG", "e.png", "f.txt"]:
        (tmp_path / "daisy").mkdir(exist_ok=True)
        (tmp_path / "daisy" / name).write_bytes(jpeg)
    (tmp_path / "roses").mkdir()
    (tmp_path / "roses" / "x.jpg").write_bytes(jpeg)

    assert check_flowers(tmp_path, {"daisy": 4, "roses": 1}) == {"daisy": 4, "roses": 1}
    with pytest.raises(DownloadError, match="class 'daisy' has 4 images, expected 5"):
        check_flowers(tmp_path, {"daisy": 5, "roses": 2})
    with pytest.raises(DownloadError, match="class 'tulips' is missing"):
        check_flowers(tmp_path, {"daisy": 4, "roses": 1, "tulips": 1})
    with pytest.raises(DownloadError, match="not a folder"):
        check_flowers(tmp_path / "nowhere")


# --- unsafe archives ------------------------------------------------------------------------


def _unsafe_archives(outside: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    """Archives that, extracted naively, write ``evil.txt`` outside the destination."""
    evil = b"pwned\n"
    return {
        "parent": [_file("flower_photos/ok.jpg", b"x"), _file("../../evil.txt", evil)],
        "absolute": [_file(str(outside / "evil.txt"), evil)],
        "symlink-absolute": [
            _dir("flower_photos"),
            _link("flower_photos/link", str(outside)),
            _file("flower_photos/link/evil.txt", evil),
        ],
        "symlink-relative": [
            _dir("flower_photos"),
            _link("flower_photos/up", "../../.."),
            _file("flower_photos/up/evil.txt", evil),
        ],
        # Each link looks harmless on its own: a -> b/.. is "." until b -> "." is extracted.
        "symlink-chain": [_link("a", "b/.."), _link("b", "."), _file("a/evil.txt", evil)],
        "symlink-only": [_dir("flower_photos"), _link("flower_photos/passwd", "/etc/passwd")],
        "hardlink": [_link("secret", str(outside / "secret.txt"), tarfile.LNKTYPE)],
    }


UNSAFE_CASES = list(_unsafe_archives(Path("/x")))


@pytest.fixture(params=["tarfile-filter", "own-check-only"])
def tar_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with tarfile's data filter, and without it to prove the explicit check suffices."""
    if request.param == "own-check-only":
        trusted = "fully_trusted" if hasattr(tarfile, "fully_trusted_filter") else None
        monkeypatch.setattr(download, "_TAR_FILTER", trusted)
    return request.param


@pytest.mark.parametrize("case", UNSAFE_CASES)
def test_safe_extract_tar_refuses_members_outside_dest(
    tmp_path: Path, case: str, tar_filter: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(make_tgz(_unsafe_archives(outside)[case]))
    dest = tmp_path / "x" / "dest"  # deep enough that "../../evil.txt" stays under tmp_path

    with pytest.raises(DownloadError, match="Refusing to extract"):
        safe_extract_tar(archive, dest)

    assert list(tmp_path.rglob("evil.txt")) == []
    assert leftovers(dest) == []
    assert (outside / "secret.txt").read_text() == "secret\n"


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink-absolute", "symlink-chain"])
def test_cli_refuses_unsafe_flowers_archive(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, tar_filter: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    url = server.publish("flower_photos.tgz", make_tgz(_unsafe_archives(outside)[case]))
    dest = tmp_path / "x" / "dest"

    assert main(["flowers", "--dest", str(dest), "--url", url]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: Refusing to extract") and err.count("\n") == 1
    assert list(tmp_path.rglob("evil.txt")) == []
    assert leftovers(dest) == []


def test_safe_extract_tar_allows_links_inside_and_never_overwrites(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    members = [_dir("top"), _file("top/a.txt", b"a"), _link("top/b.txt", "a.txt")]
    archive.write_bytes(make_tgz(members))
    dest = tmp_path / "dest"

    safe_extract_tar(archive, dest)
    assert (dest / "top" / "b.txt").read_bytes() == b"a"
    with pytest.raises(DownloadError, match="already exists"):
        safe_extract_tar(archive, dest)
    assert leftovers(dest) == ["top"]


# --- weights --------------------------------------------------------------------------------


WEIGHT_BYTES = b"not really a checkpoint, but bytes with a known sha256\n" * 1000
SHA256 = hashlib.sha256(WEIGHT_BYTES).hexdigest()
WRONG_PREFIX = f"{int(SHA256[:8], 16) ^ 0xFFFFFFFF:08x}"


def test_cli_weights_with_matching_hash_in_name_is_saved(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.publish(f"vit-{SHA256[:8]}.pth", WEIGHT_BYTES)
    dst = tmp_path / "weights" / "vit.pth"

    assert main(["weights", "--output", str(dst), "--url", url]) == 0

    assert dst.read_bytes() == WEIGHT_BYTES
    assert leftovers(dst.parent) == ["vit.pth"]
    assert "saved at" in capsys.readouterr().out


def test_cli_weights_with_wrong_hash_leaves_no_file(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.publish(f"vit-{WRONG_PREFIX}.pth", WEIGHT_BYTES)
    dst = tmp_path / "weights" / "vit.pth"

    assert main(["weights", "--output", str(dst), "--url", url]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sha256" in err and err.count("\n") == 1
    assert leftovers(dst.parent) == []  # neither the file nor a .partial


def test_mirror_of_pth_without_hash_in_name_is_checked_against_published_prefix(
    server: Server, tmp_path: Path
) -> None:
    url = server.publish("vit_base_patch16_224_in21k.pth", WEIGHT_BYTES)
    with pytest.raises(DownloadError, match="e5005f0a"):
        download_weights("pth", tmp_path / "vit.pth", url, progress=False)
    assert leftovers(tmp_path) == ["served"]


def test_failed_download_keeps_existing_destination(server: Server, tmp_path: Path) -> None:
    url = server.publish("w.pth", WEIGHT_BYTES)
    dst = tmp_path / "w" / "w.pth"
    dst.parent.mkdir()
    dst.write_bytes(b"good old file")

    with pytest.raises(DownloadError, match="sha256"):
        download_file(url, dst, hash_prefix=WRONG_PREFIX, progress=False)
    assert dst.read_bytes() == b"good old file"
    assert leftovers(dst.parent) == ["w.pth"]

    assert download_file(url, dst, hash_prefix=SHA256[:8], progress=False) == dst
    assert dst.read_bytes() == WEIGHT_BYTES
    assert leftovers(dst.parent) == ["w.pth"]


def npz_bytes() -> bytes:
    """A small archive written by numpy.savez, as Google's ViT-B_16.npz is."""
    buf = io.BytesIO()
    np.savez(buf, **{"Transformer/encoder_norm/scale": np.ones(8, np.float32)})
    return buf.getvalue()


def test_npz_weights_without_hash_are_saved_into_an_output_folder(
    server: Server, tmp_path: Path
) -> None:
    url = server.publish("mirror.npz", npz_bytes())
    folder = tmp_path / "weights"
    folder.mkdir()
    assert main(["weights", "--format", "npz", "--output", str(folder), "--url", url]) == 0
    assert (folder / "ViT-B_16.npz").read_bytes() == npz_bytes()
    assert leftovers(folder) == ["ViT-B_16.npz"]


@pytest.mark.parametrize("served", [b"<html>Sign in to continue</html>\n",
                                    npz_bytes()[:-40]])  # an error page; a cut-off archive
def test_npz_weights_that_are_no_npz_archive_are_discarded(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], served: bytes
) -> None:
    # No hash is published for the .npz, so its content is what is checked.
    url = server.publish("ViT-B_16.npz", served)
    dst = tmp_path / "weights" / "ViT-B_16.npz"
    assert main(["weights", "--format", "npz", "--output", str(dst), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: The file downloaded from {url} is not a .npz archive of arrays (an "
                   f"error page?) and was discarded; check that the URL points to the "
                   f"weights.\n")
    assert leftovers(dst.parent) == []  # neither the file nor a .partial


def test_existing_weights_are_not_downloaded_again(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.publish(f"vit-{SHA256[:8]}.pth", WEIGHT_BYTES)
    dst = tmp_path / "vit.pth"
    dst.write_bytes(WEIGHT_BYTES)

    assert main(["weights", "--output", str(dst), "--url", url]) == 0
    assert "already present" in capsys.readouterr().out
    assert server.requests == []

    dst.write_bytes(b"something else")
    with pytest.raises(DownloadError, match="exists but its sha256"):
        download_weights("pth", dst, url, progress=False)
    assert dst.read_bytes() == b"something else"
    assert server.requests == []


# --- HTTP and connection errors -------------------------------------------------------------


@pytest.mark.parametrize("command", ["flowers", "weights"])
def test_http_404_is_a_clear_error(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    url = f"{server.base_url}/missing-file"
    out = tmp_path / "out"
    target = ["--dest", str(out)] if command == "flowers" else ["--output", str(out / "w.pth")]

    assert main([command, *target, "--url", url]) == 2

    err = capsys.readouterr().err
    assert err == f"error: Downloading {url} failed with HTTP 404 File not found; check the URL.\n"
    assert leftovers(out) == []


def test_download_cut_short_leaves_no_file(
    short_body_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No hash to catch it (npz): the Content-Length check must."""
    dst = tmp_path / "w" / "ViT-B_16.npz"
    assert main(["weights", "--format", "npz", "--output", str(dst), "--url", short_body_url]) == 2
    err = capsys.readouterr().err
    assert "stopped after 10 of 100000 bytes" in err and err.count("\n") == 1
    assert leftovers(dst.parent) == []


def test_connection_refused_is_a_clear_error(
    closed_port_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "data"
    assert main(["flowers", "--dest", str(dest), "--url", closed_port_url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Could not reach {closed_port_url}") and err.count("\n") == 1
    assert "Traceback" not in err
    assert leftovers(dest) == []


# --- hostile destinations ----------------------------------------------------------------------


def test_a_failed_cleanup_does_not_hide_the_write_error(tmp_path: Path) -> None:
    """The destination's folder is a file: the temporary file cannot be made, nor removed."""
    from errors import WriteError

    (tmp_path / "file").write_text("keep me")
    with pytest.raises(WriteError, match="Cannot write"):
        download_file("file:///nonexistent", tmp_path / "file" / "x.pth", progress=False)
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("argv", [["flowers", "--dest", "{file}"],
                                  ["weights", "--output", "{file}/x.pth"]])
def test_cli_destination_under_a_file_is_one_error_line(tmp_path, capsys, argv) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    rc = main([a.format(file=blocker) for a in argv] + ["--url", "file:///nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: Cannot write") and len(err.splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_an_existing_npz_output_that_is_not_an_archive_is_reported(tmp_path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    rc = main(["weights", "--format", "npz", "--output", str(notes),
               "--url", "file:///nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a .npz archive" in err and notes.read_text() == "keep me"


def test_a_folder_where_the_flowers_archive_goes_is_one_error_line(tmp_path, capsys) -> None:
    in_the_way = tmp_path / "flower_photos.tgz"
    (in_the_way / "keep").mkdir(parents=True)
    rc = main(["flowers", "--dest", str(tmp_path), "--url", "file:///nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"error: {in_the_way} is a folder in the way of the download; "
                               f"move it or pick another --dest.\n")
    assert (in_the_way / "keep").is_dir()
