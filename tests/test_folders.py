"""Your own images: a folder of class subfolders, made of real CIFAR-10 images written as real files.

Each kind of bad input has a test on real files: it gets one line, or is skipped and counted, and nothing
in the folder changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar10_cnn import folders as F
from cifar10_cnn.errors import DataError

from .conftest import ROOT

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_images(
    folder: Path, images: np.ndarray, start: int = 0, fmt: str = "png", names=None
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in zip(names if names is not None else range(start, start + len(images)), images, strict=True):
        paths.append(folder / f"{i:05d}.{fmt}")
        Image.fromarray(img).save(paths[-1])
    return paths


def make_folder(root: Path, cifar, classes=(0, 1, 2), per_class: int = 15, split: str = "") -> Path:
    """root/<split>/<class name>/NNNNN.png from the real training images of those classes."""
    for c in classes:
        idx = np.flatnonzero(cifar.train_labels == c)[:per_class]
        write_images(root / split / CLASSES[c], cifar.train_images[idx], names=idx)  # named by index
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (links not followed) and a digest of each regular file."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            ok = p.is_file() and not p.is_symlink() and os.access(p, os.R_OK)
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if ok else "?"
    return out


def load(root: Path, tmp_path: Path, **kw) -> F.FolderData:
    return F.load_folder(root, cache_dir=tmp_path / "cache", progress=False, **kw)


def originals(cifar, rels) -> np.ndarray:
    return cifar.train_images[[int(Path(r).stem) for r in rels]]


# --- layouts, split, pixels --------------------------------------------------------------------------------


def test_flat_folder_gives_sorted_classes_exact_pixels_and_a_stratified_seeded_test_split(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(3, 0, 8))
    data = load(root, tmp_path)
    assert data.classes == ("airplane", "cat", "ship")  # folder names, sorted
    assert len(data.train_images) + len(data.test_images) == 45
    assert np.bincount(data.test_labels).tolist() == [3, 3, 3]  # a fifth of each class
    assert np.array_equal(data.test_images, originals(cifar, data.test_files))  # PNG at 32x32: unchanged
    names = [CLASSES[c] for c in cifar.train_labels[[int(Path(r).stem) for r in data.test_files]]]
    assert [data.classes[y] for y in data.test_labels] == names
    again = load(root, tmp_path / "other")  # no cache: the same files are test files
    assert again.test_files == data.test_files and not data.skipped and data.duplicates == 0


def test_train_and_test_folders_are_used_as_they_are(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(1, 2), per_class=10, split="train")
    for c in (1, 2):
        idx = np.flatnonzero(cifar.test_labels == c)[:4]
        write_images(root / "test" / CLASSES[c], cifar.test_images[idx])
    data = load(root, tmp_path)
    assert data.classes == ("automobile", "bird")
    assert (len(data.train_images), len(data.test_images)) == (20, 8)
    assert all(f.startswith("test/") for f in data.test_files)
    assert np.array_equal(np.bincount(data.train_labels), [10, 10])


def test_jpeg_and_large_images_are_decoded_like_predict_does(cifar, tmp_path):
    from cifar10_cnn.images import read_image_file

    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=6)
    big = Image.fromarray(cifar.train_images[0]).resize((300, 200))
    big.save(root / "airplane" / "big.jpg", quality=90)
    data = load(root, tmp_path)
    both = np.concatenate([data.train_images, data.test_images])
    assert len(both) == 13
    assert any(np.array_equal(x, read_image_file(root / "airplane" / "big.jpg")) for x in both)


# --- the cache ---------------------------------------------------------------------------------------------


def test_the_second_load_comes_from_the_cache_and_a_changed_folder_is_read_again(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=20)
    first = load(root, tmp_path)
    second = load(root, tmp_path)
    assert not first.cached and second.cached
    assert second.sha256 == first.sha256 and second.test_files == first.test_files
    # What was checked is said as it was: never "verified" (nothing published to verify your images against).
    (key,) = [p.name[:12] for p in (tmp_path / "cache").glob("folders/*")]
    assert first.check() == f"read from the folder: 40 files hashed, cache {key}"
    assert second.check() == f"cache hit, re-hashed: 40 files unchanged in name, size and mtime, cache {key}"
    assert not first.verified and not second.verified
    assert first.provenance()["checked"] == first.check() and first.provenance()["verified"] is False
    assert np.array_equal(second.train_images, first.train_images)
    # One file rewritten with other pixels (its size and mtime change): read again, and the pixels are the new ones.
    target = root / first.test_files[0]
    Image.fromarray(cifar.train_images[999]).save(target)
    os.utime(target, ns=(1, 1))
    third = load(root, tmp_path)
    assert not third.cached and third.sha256["files"] != first.sha256["files"]
    assert any(np.array_equal(x, cifar.train_images[999]) for x in third.test_images)


def test_a_damaged_cache_is_not_used(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=10)
    first = load(root, tmp_path)
    (npy,) = (tmp_path / "cache").glob("folders/*/images.npy")
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    again = load(root, tmp_path)
    assert not again.cached and again.sha256 == first.sha256


def test_the_recorded_test_files_stay_the_test_set_when_the_folder_grows(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=10)
    first = load(root, tmp_path)
    write_images(root / "airplane", cifar.test_images[:5], start=90000)
    grown = load(root, tmp_path, test_files=first.test_files)
    assert grown.test_files == first.test_files and len(grown.train_images) == len(first.train_images) + 5
    os.unlink(root / first.test_files[0])
    with pytest.raises(DataError, match="1 of the run's 4 test files are no longer"):
        load(root, tmp_path, test_files=first.test_files)


# --- bad input: one line, or skipped and counted; the folder is left as it was --------------------------------


def png_bomb(path: Path, side: int = 30_000) -> None:
    """A PNG whose header claims side x side pixels (a few hundred bytes on disk)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_files_that_are_not_images_are_skipped_counted_and_named(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=10)
    (root / "airplane" / "notes.txt").write_text("not an image")
    (root / "airplane" / "fake.png").write_text("not a png either")
    png_bomb(root / "automobile" / "bomb.png")
    (root / "automobile" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored, not counted
    os.mkfifo(root / "automobile" / "pipe.png")  # a FIFO must not block the read
    before = snapshot(root)
    data = load(root, tmp_path)
    assert len(data.train_images) + len(data.test_images) == 20
    reasons = dict(data.skipped)
    assert sorted(reasons) == [
        "airplane/fake.png",
        "airplane/notes.txt",
        "automobile/bomb.png",
        "automobile/pipe.png",
    ]
    assert "not an image file" in reasons["airplane/notes.txt"]
    assert "not an image in a supported format" in reasons["airplane/fake.png"]
    assert "pixels" in reasons["automobile/bomb.png"]  # the decoder's bound, before any pixel is decoded
    assert "not a regular file" in reasons["automobile/pipe.png"]
    (note,) = data.notes()
    assert note.startswith("skipped 4 files that are not readable images (first: airplane/fake.png")
    assert data.provenance()["skipped"] == 4 and len(data.provenance()["skipped_first"]) == 3
    assert snapshot(root) == before


def test_symbolic_links_out_of_the_folder_are_not_followed(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=10)
    outside = write_images(tmp_path / "elsewhere" / "secret", cifar.train_images[100:103])
    os.symlink(outside[0], root / "airplane" / "out.png")
    os.symlink(outside[0].parent, root / "airplane" / "outdir")
    os.symlink(outside[0].parent, root / "secret")  # a class folder that is a link out: not a class
    os.symlink(root / "automobile" / sorted(os.listdir(root / "automobile"))[0], root / "airplane" / "in.png")
    data = load(root, tmp_path)
    assert data.classes == ("airplane", "automobile")
    reasons = dict(data.skipped)
    assert "outside" in reasons["airplane/out.png"] and "outside" in reasons["airplane/outdir"]
    assert len(data.train_images) + len(data.test_images) == 21  # the link inside is followed
    both = np.concatenate([data.train_images, data.test_images])
    assert not any(np.array_equal(x, cifar.train_images[100]) for x in both)


def test_the_same_image_in_train_and_test_is_warned_as_leakage(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=10, split="train")
    for c in (0, 1):
        test = root / "test" / CLASSES[c]
        test.mkdir(parents=True)
        for p in sorted((root / "train" / CLASSES[c]).iterdir())[:3]:
            shutil.copy(p, test / f"copy-{p.name}")
        idx = np.flatnonzero(cifar.test_labels == c)[:2]
        write_images(test, cifar.test_images[idx])
    data = load(root, tmp_path)
    assert data.duplicates == 6
    assert any("6 test images are identical to training images (leakage" in n for n in data.notes())
    assert data.provenance()["train_test_duplicates"] == 6


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "has no class folders"),
        ("one class", r"one class folder only \(cat\)"),
        ("no readable image", "class folder bird of .* holds no readable image; 2 files were skipped"),
        ("too many classes", "4 class folders, more than --max-classes 3"),
        ("newline in a class name", r"class folder 'bad\\\\nname'.*printable UTF-8"),
        ("non-UTF-8 class name", r"class folder 'caf\\\\udce9'.*printable UTF-8"),
        ("test class not in train", "has class folders that .*train lacks"),
        ("not a folder", "is not a folder"),
        ("missing", "does not exist"),
    ],
)
def test_bad_folders_are_one_clear_line_and_change_nothing(cifar, tmp_path, case, message):
    root = tmp_path / "imgs"
    root.mkdir()
    if case == "one class":
        make_folder(root, cifar, classes=(3,), per_class=3)
    elif case == "no readable image":
        make_folder(root, cifar, classes=(0, 1), per_class=3)
        (root / "bird").mkdir()
        (root / "bird" / "a.png").write_bytes(b"")
        (root / "bird" / "readme.txt").write_text("x")
    elif case == "too many classes":
        make_folder(root, cifar, classes=(0, 1, 2, 3), per_class=2)
    elif case == "newline in a class name":
        make_folder(root, cifar, classes=(0,), per_class=2)
        write_images(root / "bad\nname", cifar.train_images[:2])
    elif case == "non-UTF-8 class name":
        make_folder(root, cifar, classes=(0,), per_class=2)
        write_images(Path(os.fsdecode(bytes(root) + b"/caf\xe9")), cifar.train_images[:2])
    elif case == "test class not in train":
        make_folder(root, cifar, classes=(0, 1), per_class=3, split="train")
        make_folder(root, cifar, classes=(0, 2), per_class=3, split="test")
    elif case == "not a folder":
        root.rmdir()
        root.write_text("x")
    elif case == "missing":
        root.rmdir()
    before = snapshot(root) if root.is_dir() else None
    with pytest.raises(DataError, match=message) as e:
        load(root, tmp_path, max_classes=3)
    assert "\n" not in str(e.value)
    assert (snapshot(root) if root.is_dir() else None) == before


def test_file_names_with_any_bytes_are_read_and_shown_on_one_line(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=5)
    raw = bytes(root / "airplane") + b"/caf\xe9.png"
    Image.fromarray(cifar.train_images[500]).save(os.fsdecode(raw), format="PNG")
    Path(os.fsdecode(bytes(root / "automobile") + b"/bad\nname.png")).write_text("no image")
    data = load(root, tmp_path)
    assert len(data.train_images) + len(data.test_images) == 11
    (note,) = data.notes()
    assert "automobile/bad\\nname.png" in note and "\n" not in note
    again = load(root, tmp_path)  # the cache stores such names too
    assert again.cached and again.test_files == data.test_files


UNPRIVILEGED = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


def load_unprivileged(root: Path, cache: Path) -> subprocess.CompletedProcess:
    """load_folder in a process that file permissions bind (root's override dropped, as for any user)."""
    code = (
        "import sys\nfrom cifar10_cnn.folders import load_folder\nfrom cifar10_cnn.errors import DataError\n"
        f"try:\n d = load_folder({str(root)!r}, cache_dir={str(cache)!r}, progress=False)\n"
        " print(len(d.train_images) + len(d.test_images)); print(*d.notes(), sep='\\n')\n"
        "except DataError as e:\n print('error:', e)\n"
    )
    prefix = UNPRIVILEGED if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.skipif(
    os.geteuid() == 0 and not shutil.which("setpriv"), reason="root, and no setpriv to drop privileges"
)
def test_unreadable_files_are_skipped_and_an_unreadable_class_folder_is_one_line(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=6)
    locked = sorted((root / "airplane").iterdir())[0]
    locked.chmod(0)
    proc = load_unprivileged(root, tmp_path / "cache")
    assert proc.stdout.splitlines()[0] == "11", proc.stdout + proc.stderr
    assert f"airplane/{locked.name}: cannot read the file (Permission denied)" in proc.stdout
    (root / "automobile").chmod(0)
    proc = load_unprivileged(root, tmp_path / "cache")
    assert (
        proc.stdout.startswith("error: cannot list ")
        and "(Permission denied); check its permissions" in proc.stdout
    )
    (root / "automobile").chmod(0o755)


# --- end to end through the command line ---------------------------------------------------------------------


def serve_model(run: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`cifar10 serve RUN` on a free port of 127.0.0.1, once /health answers."""
    import time

    import httpx

    from .conftest import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar10_cnn", "serve", str(run), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError((tmp_path / "serve.log").read_text())


def page_shows_the_classes(url: str) -> None:
    """The service's page, in a real browser (Chromium), names the folder's classes in its title and text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.querySelector('#classes').textContent.length > 0")
            assert page.inner_text("#classes") == "The model knows 3 classes: bird, cat, ship."
            assert page.inner_text("h1") == page.title() == "Image classifier (3 classes)"
        finally:
            browser.close()


def test_train_evaluate_predict_export_and_serve_a_folder_through_the_cli(cifar, cache_dir, tmp_path):
    import httpx

    from cifar10_cnn.weights import load_model

    from .conftest import in_process, run_cli

    root = make_folder(tmp_path / "my images", cifar, classes=(2, 3, 8), per_class=40)
    (root / "cat" / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    proc = run_cli("train", "--data-dir", str(root), "--epochs", "1", "--out", str(run), "--no-progress")
    header = next(line for line in proc.stdout.splitlines() if line.startswith("model "))
    assert f"data folder:{root} (read from the folder: 120 files hashed, cache " in header
    assert ") | train 87 / val 9 / test 24" in header and "verified" not in header.lower()
    assert (
        "skipped 1 file that is not a readable image (first: cat/notes.txt: not an image file)" in proc.stdout
    )
    assert "120 images of 3 classes read in" in proc.stdout
    _, meta = load_model(run / "model.safetensors")
    assert meta.classes == ("bird", "cat", "ship")
    report = (run / "report.md").read_text()
    assert all(f"| {name} |" in report for name in meta.classes) and "| airplane |" not in report
    assert "your own images, 3 classes; read from the folder: 120 files hashed, cache " in report
    assert "; 1 files skipped, not readable images (first: cat/notes.txt:" in report
    assert json.loads((run / "results.json").read_text())["data"]["verified"] is False
    recorded = json.loads((run / "test_files.json").read_text())
    assert recorded["root"] == str(root) and len(recorded["test_files"]) == 24
    # The folder grows; evaluate still uses the run's 24 test files.
    write_images(root / "bird", cifar.test_images[:6], start=70000)
    # train and serve are real processes; evaluate, predict and export call main() in this one.
    assert in_process("evaluate", str(run), "--no-progress").returncode == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test_size"] == 24 and results["class_names"] == ["bird", "cat", "ship"]
    out = in_process("predict", str(run), str(root / "ship")).stdout
    assert "ship/" in out and not any(c in out for c in ("airplane", "truck", "automobile"))
    exported = in_process(
        "export", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")
    )
    assert "verified on 24 test images of the run" in exported.stdout
    server, url = serve_model(run, tmp_path)
    try:
        model = httpx.get(f"{url}/model", timeout=10).json()
        assert model["classes"] == ["bird", "cat", "ship"]
        png = (root / "cat" / sorted(os.listdir(root / "cat"))[0]).read_bytes()
        answer = httpx.post(f"{url}/predict", files={"file": ("c.png", png, "image/png")}, timeout=30).json()
        (result,) = answer["results"]
        assert sorted(p["class"] for p in result["predictions"]) == ["bird", "cat", "ship"], answer
        page_shows_the_classes(url)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_recipes_fixed_validation_split_is_a_tenth_of_a_small_folder_and_a_given_one_is_kept(
    cifar, tmp_path
):
    from .conftest import error_line, in_process

    root = make_folder(tmp_path / "imgs", cifar, classes=(2, 3, 8), per_class=40)  # 96 train, 24 test
    # --recipe quick holds out 1,000 images: on 96 that is a tenth instead, said in one line.
    run = tmp_path / "run"
    proc = in_process("train", "--recipe", "quick", "--data-dir", str(root), "--epochs", "1",
                      "--out", str(run), "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "recipe quick holds out 1,000 images for validation, more than a tenth of the 96 training images "
        "here: holding out 9 instead (--val-size N to choose)"
    ) in proc.stdout.splitlines()
    assert "| train 87 / val 9 / test 24 |" in proc.stdout
    assert json.loads((run / "config.json").read_text())["val_size"] == 9  # evaluate rebuilds the same split
    # A temperature fitted on 9 images is uncertain: said in one line, in results.json and in the report.
    warning = (
        "warning: the softmax temperature was fitted on only 9 validation images (under 500), so it is "
        "uncertain and the calibrated probabilities may be no better than the raw ones; hold out more with "
        "--val-size N"
    )
    assert warning in proc.stdout.splitlines()
    assert json.loads((run / "results.json").read_text())["served"]["temperature_warning"] == warning
    calibration = (run / "report.md").read_text().split("## Calibration", 1)[1].split("\n## ", 1)[0]
    assert warning in calibration
    # A --val-size the user gives is theirs: too large is one line, and no run directory.
    proc = in_process("train", "--recipe", "quick", "--val-size", "1000", "--data-dir", str(root),
                      "--epochs", "1", "--out", str(tmp_path / "run2"), "--no-progress")  # fmt: skip
    assert proc.returncode == 2
    assert "--val-size 1000 must be less than the 96 training images" in error_line(proc)
    assert not (tmp_path / "run2").exists()
    # A smaller one is kept as given, even below a tenth's share of the training images left.
    proc = in_process("train", "--recipe", "quick", "--val-size", "30", "--data-dir", str(root),
                      "--epochs", "1", "--out", str(tmp_path / "run3"), "--no-progress")  # fmt: skip
    assert proc.returncode == 0 and "| train 66 / val 30 / test 24 |" in proc.stdout
    assert "holding out" not in proc.stdout


def test_bad_folders_through_the_cli_are_one_line_exit_2(tmp_path, cache_dir):
    from .conftest import error_line, run_cli

    (tmp_path / "empty").mkdir()
    proc = run_cli("train", "--dataset", "folder", "--data-dir", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2 and "has no class folders" in error_line(proc)
    proc = run_cli("train", "--dataset", "cifar10", "--labels", "coarse", check=False)
    assert proc.returncode == 2 and "--labels coarse is for --dataset cifar100" in error_line(proc)


def test_worker_processes_decode_the_same_pixels_and_count_the_same_failures(cifar, tmp_path):
    root = make_folder(tmp_path / "imgs", cifar, classes=(0, 1), per_class=12)
    (root / "airplane" / "fake.png").write_text("not a png")
    here = F.load_folder(root, cache_dir="off", progress=False)
    # A fresh interpreter (one thread, so it forks) with a real pool of 2 processes and chunks of 5 files.
    code = (
        "import json, sys\nfrom cifar10_cnn import folder_decode as W, folders as F\n"
        "W.PROCESS_MIN, W.CHUNK, W.DECODE_WORKERS = 10, 5, 2\nassert W._can_fork()\n"
        f"d = F.load_folder({str(root)!r}, cache_dir='off', progress=False)\n"
        "print(json.dumps({'sha256': d.sha256, 'skipped': d.skipped, 'test_files': d.test_files}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pooled = json.loads(proc.stdout)
    assert pooled["sha256"] == here.sha256 and pooled["test_files"] == here.test_files
    assert (
        pooled["skipped"]
        == [list(x) for x in here.skipped]
        == [["airplane/fake.png", "not an image in a supported format"]]
    )
