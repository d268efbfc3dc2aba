"""Bad input of every kind: odd files are skipped with a reason, odd datasets get warnings.

Every file is generated here (Pillow, numpy or raw bytes); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from tasks.data.images import MAX_PIXELS, ImageError, check_image, load_rgb, to_rgb
from tasks.data.scan import DatasetError, Duplicate, Manifest, scan
from tasks.features.store import FeatureStore, StoreError
from tests.conftest import write_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(path: Path, image: Image.Image, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _blank_bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of one colour: ~50 KB on disk for 20000x20000, but 400 MB decoded."""
    row = bytes(1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts += [compressor.compress(row * (height % 1000)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _noise(size: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file per kind of unusable input; return {file name: expected reason part}."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _save(folder / "whole.tmp.jpg", _noise(), format="JPEG").read_bytes()
    png = _save(folder / "whole.tmp.png", _noise(), format="PNG").read_bytes()
    for tmp in folder.glob("whole.tmp.*"):
        tmp.unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.jpg").write_text("these are my notes, not a photo\n")
    (folder / "error.jpg").write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>")
    (folder / "photo_heic.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (folder / "binary.png").write_bytes(bytes(range(256)) * 4)
    _save(folder / "lab.tif", Image.new("LAB", (16, 16), (50, 0, 0)))
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    _save(folder / "dot.png", Image.new("RGB", (1, 1), RED))
    _save(folder / "strip.png", Image.new("RGB", (200, 4), RED))
    _blank_bilevel_png(folder / "bomb.png", 20_000, 20_000)
    _blank_bilevel_png(folder / "big.png", 10_001, 10_000)
    return {
        "empty.jpg": "empty file",
        "cut.jpg": "truncated",
        "cut.png": "truncated",
        "notes.jpg": "a text file",
        "error.jpg": "HTML page",
        "photo_heic.jpg": "HEIC",
        "binary.png": "not a readable image",
        "lab.tif": "unsupported colour mode LAB",
        "photo.heic": "not an image extension (.heic)",
        "dot.png": "too small (1x1",
        "strip.png": "too small (200x4",
        "bomb.png": "too large",
        "big.png": "too large (10001x10000",
    }


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, _bad_files(folder)


# --- single files ---------------------------------------------------------------------------


def test_each_bad_file_has_a_reason_and_load_raises_image_error(
    bad_folder: tuple[Path, dict[str, str]],
) -> None:
    folder, expected = bad_folder
    with warnings.catch_warnings():  # Pillow warns about the 100-megapixel file before we reject
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for name, reason in expected.items():
            if name.endswith(".heic"):
                continue  # rejected by extension at scan time
            assert reason in (check_image(folder / name) or ""), name
            with pytest.raises(ImageError):
                load_rgb(folder / name, 16)


def test_scan_skips_every_bad_file_with_its_reason(
    image_tree: Path, bad_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, expected = bad_folder
    shutil.copytree(folder, image_tree / "cats" / "bad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        manifest = scan(image_tree)
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert len(manifest.records) == 24
    for name, reason in expected.items():
        assert reason in reasons[f"cats/bad/{name}"]


def test_decompression_bomb_is_rejected_without_decoding(tmp_path: Path) -> None:
    bomb = _blank_bilevel_png(tmp_path / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 200_000 and 20_000 * 20_000 > MAX_PIXELS
    probe = (
        "import sys; from tasks.data.images import check_image; "
        "print(check_image(sys.argv[1])); "
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(bomb)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[3],
    )
    reason, max_rss_kb = result.stdout.splitlines()
    assert "too large" in reason
    assert int(max_rss_kb) < 250_000  # decoding would need 400 MB: the pixels were never read


def test_webp_decodes_when_pillow_supports_it(tmp_path: Path) -> None:
    path = _save(tmp_path / "red.webp", Image.new("RGB", (16, 16), RED), lossless=True)
    if features.check("webp"):
        assert check_image(path) is None
        assert load_rgb(path, 8)[4, 4].tolist() == list(RED)
    else:
        assert check_image(path)


def test_unknown_tiff_compression_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    data = bytearray(_save(tmp_path / "x.tif", Image.new("RGB", (16, 16), RED)).read_bytes())
    first_ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[first_ifd : first_ifd + 2])[0]):
        entry = first_ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 259:  # Compression
            data[entry + 8 : entry + 10] = struct.pack("<H", 34712)  # JPEG 2000, unsupported
    (tmp_path / "x.tif").write_bytes(bytes(data))
    assert "not a readable image" in check_image(tmp_path / "x.tif")


def test_grayscale_and_bilevel_become_grey_rgb(tmp_path: Path) -> None:
    grey = load_rgb(_save(tmp_path / "g.png", Image.new("L", (16, 16), 77)), 8)
    assert grey.shape == (8, 8, 3) and np.all(grey == 77)
    bilevel = load_rgb(_save(tmp_path / "b.png", Image.new("1", (16, 16), 1)), 8)
    assert np.all(bilevel == 255)


def test_transparency_becomes_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))
    array = load_rgb(_save(tmp_path / "rgba.png", rgba), 16)
    assert array[8, 2].tolist() == list(BLUE) and array[8, 13].tolist() == list(WHITE)

    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    array = load_rgb(_save(tmp_path / "p.png", palette, transparency=0), 16)
    assert array[8, 2].tolist() == list(BLUE) and array[8, 13].tolist() == list(WHITE)

    keyed = load_rgb(
        _save(tmp_path / "k.png", Image.new("RGB", (16, 16), RED), transparency=RED), 8
    )
    assert np.all(keyed == 255)


def test_cmyk_jpeg_colours_are_right(tmp_path: Path) -> None:
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    red = load_rgb(path, 8)[4, 4]
    assert red[0] > 230 and red[1] < 25 and red[2] < 25


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    path = _save(tmp_path / "ramp16.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I;16")
    array = load_rgb(path, 64)[..., 0]
    assert array[:, 0].max() < 5 and array[:, -1].min() > 250
    assert 110 < array[:, 32].mean() < 145  # a plain convert() would make this column 255
    assert (array == 255).mean() < 0.05


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(tmp_path / "rotated.jpg", stored, exif=exif.tobytes(), quality=95)
    with Image.open(path) as image:
        assert to_rgb(image).size == (20, 40)  # portrait once oriented
    array = load_rgb(path, 16)
    assert array[2, 8, 0] > 200 and array[2, 8, 2] < 60  # red on top
    assert array[13, 8, 2] > 200 and array[13, 8, 0] < 60  # blue at the bottom


def test_smallest_usable_image_is_8_pixels_a_side(tmp_path: Path) -> None:
    assert check_image(_save(tmp_path / "8.png", Image.new("RGB", (8, 8), RED))) is None
    assert "too small (7x8" in check_image(_save(tmp_path / "7.png", Image.new("RGB", (7, 8))))


def test_content_decides_the_format_not_the_extension(tmp_path: Path) -> None:
    path = _save(tmp_path / "actually_png.jpg", Image.new("RGB", (16, 16), RED), format="PNG")
    assert check_image(path) is None


# --- names, links and special files in a scan ------------------------------------------------


def test_unicode_and_non_utf8_names(image_tree: Path) -> None:
    good = (image_tree / "cats" / "img_00.png").read_bytes()
    unicode_class = image_tree / "猫"
    for i, name in enumerate(("café.png", "写真 1.png", "🐱.png")):
        write_image(unicode_class / name, seed=500 + i)
    cats = os.fsencode(image_tree / "cats")
    with open(cats + b"/caf\xe9.png", "wb") as handle:
        handle.write(good)
    os.makedirs(os.fsencode(image_tree) + b"/bad\xffclass")
    with open(os.fsencode(image_tree) + b"/bad\xffclass/x.png", "wb") as handle:
        handle.write(good)
    manifest = scan(image_tree)
    assert manifest.class_names == ["cats", "dogs", "猫"]
    assert {r.path for r in manifest.records if r.label == "猫"} == {
        "猫/café.png",
        "猫/写真 1.png",
        "猫/🐱.png",
    }
    for record in manifest.records:
        load_rgb(Path(manifest.root) / record.path, 8)
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert "not valid UTF-8" in reasons["cats/caf\\xe9.png"]
    assert "not valid UTF-8" in reasons["bad\\xffclass"]
    json.dumps(manifest.to_dict(), ensure_ascii=False).encode("utf-8")  # writable as UTF-8


def test_symlinks(image_tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_image(outside / "linked_file.png", seed=700)
    for i in range(2):
        write_image(outside / "folder" / f"{i}.png", seed=710 + i)
    cats = image_tree / "cats"
    (cats / "file_link.png").symlink_to(outside / "linked_file.png")
    (cats / "folder_link").symlink_to(outside / "folder", target_is_directory=True)
    (cats / "loop_up").symlink_to(image_tree, target_is_directory=True)
    (cats / "loop_self").symlink_to(cats, target_is_directory=True)
    (cats / "self.png").symlink_to(cats / "self.png")
    (cats / "gone.png").symlink_to(outside / "deleted.png")
    manifest = scan(image_tree)
    paths = {r.path for r in manifest.records}
    assert {"cats/file_link.png", "cats/folder_link/0.png", "cats/folder_link/1.png"} <= paths
    assert len(manifest.records) == 27
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert "enclosing folder" in reasons["cats/loop_up"]
    assert "enclosing folder" in reasons["cats/loop_self"]
    assert reasons["cats/self.png"] == "symbolic link loop"
    assert "broken symbolic link" in reasons["cats/gone.png"]


def _scan_reasons_or_fail_if_it_blocks(root: Path) -> dict[str, str]:
    """The scan's skip reasons; a scan that reads a FIFO or /dev/zero never returns, so it runs
    in a thread that the test abandons (failing) after a wait no working scan comes near."""
    found: dict[str, str] = {}
    scanner = threading.Thread(
        target=lambda: found.update((s.path, s.reason) for s in scan(root).skipped), daemon=True
    )
    scanner.start()
    scanner.join(timeout=300)
    assert not scanner.is_alive(), "the scan blocked reading a pipe or device"
    return found


def test_pipes_and_devices_are_skipped_without_reading(image_tree: Path) -> None:
    os.mkfifo(image_tree / "cats" / "pipe.jpg")  # reading it would block forever
    (image_tree / "cats" / "zeros.png").symlink_to("/dev/zero")  # reading it never ends
    reasons = _scan_reasons_or_fail_if_it_blocks(image_tree)
    assert "not a regular file" in reasons["cats/pipe.jpg"]
    assert "not a regular file" in reasons["cats/zeros.png"]
    assert "not a regular file" in check_image(image_tree / "cats" / "pipe.jpg")


SKIPPED_REASONS = """
import json, sys
from tasks.data.scan import scan
print(json.dumps({s.path: s.reason for s in scan(sys.argv[1]).skipped}))
"""
OPEN_STORE = """
import sys
from tasks.features.store import FeatureStore, StoreError
try:
    FeatureStore(sys.argv[1])
except StoreError as error:
    print(error)
"""


def _without_root(script: str, *args: str) -> str:
    """Run `script` as a user that file permissions apply to and return its output: root reads
    and writes everything, so as root it runs in a user namespace without those privileges."""
    prefix = []
    if os.geteuid() == 0:
        if (
            shutil.which("unshare") is None
            or subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode != 0
        ):
            pytest.skip("as root, needs `unshare --user` to drop the permission override")
        prefix = ["unshare", "--user"]
    done = subprocess.run(
        [*prefix, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_unreadable_file_and_folder(image_tree: Path) -> None:
    locked_file, locked_folder = image_tree / "cats" / "img_00.png", image_tree / "dogs" / "locked"
    locked_folder.mkdir()
    locked_file.chmod(0)
    locked_folder.chmod(0)
    try:
        reasons = json.loads(_without_root(SKIPPED_REASONS, str(image_tree)))
    finally:
        locked_folder.chmod(0o755)
    assert reasons["cats/img_00.png"] == "cannot read: permission denied"
    assert reasons["dogs/locked"] == "cannot read: permission denied (folder not scanned)"


def test_store_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    message = _without_root(OPEN_STORE, str(read_only / "store")).strip()
    assert message == (
        f"cannot open feature store {read_only / 'store'}: [Errno 13] "
        f"Permission denied: '{read_only / 'store'}'"
    )
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot open feature store .*Not a directory"):
        FeatureStore(str(tmp_path / "a-file" / "store"))


def test_hidden_entries_archive_junk_and_nesting(image_tree: Path) -> None:
    good = (image_tree / "cats" / "img_00.png").read_bytes()
    (image_tree / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (image_tree / ".cache").mkdir()
    (image_tree / ".cache" / "x.png").write_bytes(good)
    (image_tree / "__MACOSX" / "cats").mkdir(parents=True)
    (image_tree / "__MACOSX" / "cats" / "._img_00.png").write_bytes(b"\x00\x05\x16\x07")
    (image_tree / "cats" / ".ipynb_checkpoints").mkdir()
    (image_tree / "cats" / "._img_00.png").write_bytes(b"\x00\x05\x16\x07")
    write_image(image_tree / "dogs" / "2024" / "june" / "deep.png", seed=900)
    manifest = scan(image_tree)
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert manifest.class_names == ["cats", "dogs"]
    assert reasons == {
        ".DS_Store": "hidden file",
        ".cache": "hidden folder (not scanned)",
        "__MACOSX": "macOS archive metadata folder (not scanned)",
        "cats/.ipynb_checkpoints": "hidden folder (not scanned)",
        "cats/._img_00.png": "hidden file",
    }
    deep = [r for r in manifest.records if r.path == "dogs/2024/june/deep.png"]
    assert deep and deep[0].label == "dogs"


# --- whole datasets --------------------------------------------------------------------------


def test_empty_loose_and_archive_roots_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images found"):
        scan(tmp_path)
    write_image(tmp_path / "a.png", seed=1)
    write_image(tmp_path / "b.png", seed=2)
    with pytest.raises(DatasetError, match="found 2 image files directly in the folder"):
        scan(tmp_path)
    (tmp_path / "data.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(DatasetError, match="extract the archive first"):
        scan(tmp_path / "data.zip")


def test_only_unreadable_images_names_the_reasons(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "cats" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "cats" / f"{i}.jpg").write_text("<html>Not Found</html>")
    with pytest.raises(DatasetError, match="3 x an HTML page"):
        scan(tmp_path)


def test_one_class_scans_with_a_warning(image_tree: Path) -> None:
    shutil.rmtree(image_tree / "dogs")
    manifest = scan(image_tree)
    assert manifest.class_names == ["cats"] and len(manifest.records) == 12
    assert any("only one class ('cats')" in w and "at least 2" in w for w in manifest.warnings)


def test_tiny_classes_are_named_in_a_warning(image_tree: Path) -> None:
    for i in range(2):
        write_image(image_tree / "birds" / f"{i}.png", seed=800 + i)
    manifest = scan(image_tree)
    assert "birds" in manifest.class_names
    [warning] = [w for w in manifest.warnings if "fewer than 3" in w]
    assert "'birds' (2)" in warning and "cats" not in warning


def _split_tree(root: Path, per_class: int, test_dogs: str = "dogs") -> None:
    """train/ and test/ trees of cats and dogs, every image distinct."""
    for i in range(per_class):
        write_image(root / "train" / "cats" / f"{i}.png", seed=i)
        write_image(root / "train" / "dogs" / f"{i}.png", seed=10 + i)
        write_image(root / "test" / "cats" / f"t{i}.png", seed=20 + i)
        write_image(root / "test" / test_dogs / f"t{i}.png", seed=30 + i)


def test_class_only_in_test_is_skipped_and_untested_class_warned(tmp_path: Path) -> None:
    _split_tree(tmp_path, per_class=3, test_dogs="Dogs")
    manifest = scan(tmp_path)
    assert manifest.class_names == ["cats", "dogs"]
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert (
        reasons["test/Dogs/t0.png"]
        == "class 'Dogs' has no training images (not in train/ or valid/); did you mean 'dogs'?"
    )
    assert any("without test images: 'dogs'" in w for w in manifest.warnings)


def test_split_folders_beside_class_folders_warn(image_tree: Path) -> None:
    write_image(image_tree / "test" / "cats" / "x.png", seed=3)
    manifest = scan(image_tree)
    assert "test" in manifest.class_names
    assert any("split folders (test) sit beside other folders" in w for w in manifest.warnings)


def test_duplicates_across_classes_and_splits_are_reported(tmp_path: Path) -> None:
    _split_tree(tmp_path, per_class=4)
    shutil.copy(tmp_path / "train" / "cats" / "0.png", tmp_path / "train" / "dogs" / "copy.png")
    shutil.copy(tmp_path / "train" / "cats" / "1.png", tmp_path / "test" / "cats" / "leak.png")
    manifest = scan(tmp_path)
    assert len(manifest.records) == 18  # reported, not removed: the user decides
    assert sorted(sorted(d.paths) for d in manifest.duplicates) == [
        ["test/cats/leak.png", "train/cats/1.png"],
        ["train/cats/0.png", "train/dogs/copy.png"],
    ]
    text = "\n".join(manifest.warnings)
    assert "1 identical images appear under different classes" in text
    assert "train/cats/0.png = train/dogs/copy.png" in text
    assert "in both the training and the test split" in text


def test_key_follows_dataset_changes(image_tree: Path) -> None:
    first = scan(image_tree)
    assert scan(image_tree).key == first.key
    os.utime(image_tree / "cats" / "img_00.png", (0, 0))  # touched, same bytes
    assert scan(image_tree).key == first.key
    write_image(image_tree / "cats" / "new.png", seed=4242)
    assert scan(image_tree).key != first.key
    (image_tree / "cats" / "new.png").unlink()
    again = scan(image_tree)
    assert again.key == first.key and again.records == first.records


def test_manifest_round_trips_with_new_fields(image_tree: Path, tmp_path: Path) -> None:
    from tasks.features.store import FeatureStore

    shutil.copy(image_tree / "cats" / "img_00.png", image_tree / "dogs" / "çopy.png")
    (image_tree / "dogs" / "notes.jpg").write_text("text")
    manifest = scan(image_tree)
    assert manifest.duplicates and manifest.warnings and manifest.skipped
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    store = FeatureStore(str(tmp_path / "store"))
    assert store.load_manifest(store.save_manifest(manifest)) == manifest
    old = {k: v for k, v in manifest.to_dict().items() if k not in ("warnings", "duplicates")}
    assert Manifest.from_dict(old).key == manifest.key
    assert Manifest.from_dict(old).duplicates == [] and isinstance(
        manifest.duplicates[0], Duplicate
    )
