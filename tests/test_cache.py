"""The prepared cache on the real mini subset: every image decoded once, resumable,
bad files listed with their reason while the rest are cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from chestxray.data.cache import PreparedCache, default_cache_dir, prepare_cache
from chestxray.data.images import read_image
from chestxray.data.index import load_nih
from chestxray.data.transforms import resize_gray
from chestxray.errors import DatasetError

SIZE = 64


@pytest.fixture(scope="module")
def items(mini_root) -> list[tuple[str, Path]]:
    return list(load_nih(mini_root).iter_paths())


@pytest.fixture(scope="module")
def prepared(items, tmp_path_factory):
    """The mini root prepared once with two processes."""
    cache_dir = tmp_path_factory.mktemp("cache")
    report = prepare_cache(items, cache_dir, size=SIZE, workers=2, progress=False)
    return cache_dir, report


def test_every_image_cached_equal_to_the_eval_resize(items, prepared):
    cache_dir, report = prepared
    assert (report.total, report.decoded, report.skipped, report.failed) == (93, 93, 0, {})
    assert report.cache_dir == cache_dir / str(SIZE)
    cache = PreparedCache.open(cache_dir, SIZE)
    assert len(cache) == 93 and cache.names == [n for n, _ in items] and cache.done.all()
    assert cache.images.shape == (93, SIZE, SIZE) and cache.images.dtype == np.uint8
    for row, (_, path) in enumerate(items):
        np.testing.assert_array_equal(cache.images[row], resize_gray(read_image(path), SIZE))
    rows = cache.positions([items[5][0], items[0][0]])
    assert rows.tolist() == [5, 0]
    assert cache.failed == {}
    with pytest.raises(DatasetError, match=r"image nope\.png not in the cache"):
        cache.positions(["nope.png"])


def test_rerun_skips_done_and_resumes_an_interrupted_run(items, tmp_path):
    first = prepare_cache(items[:20], tmp_path, size=SIZE, workers=1, progress=False)
    assert first.decoded == 20
    again = prepare_cache(items[:20], tmp_path, size=SIZE, workers=1, progress=False)
    assert (again.decoded, again.skipped) == (0, 20)
    # Simulate a run stopped part way: rows 3 and 11 were never marked done.
    done_file = tmp_path / str(SIZE) / "done.npy"
    done = np.load(done_file)
    done[[3, 11]] = False
    np.save(done_file, done)
    images = np.load(tmp_path / str(SIZE) / "images.npy", mmap_mode="r+")
    images[[3, 11]] = 0
    images.flush()
    del images
    resumed = prepare_cache(items[:20], tmp_path, size=SIZE, workers=1, progress=False)
    assert (resumed.decoded, resumed.skipped) == (2, 18)
    cache = PreparedCache.open(tmp_path, SIZE)
    np.testing.assert_array_equal(cache.images[11], resize_gray(read_image(items[11][1]), SIZE))
    # A different image list rebuilds rather than mixing two datasets.
    rebuilt = prepare_cache(items[5:15], tmp_path, size=SIZE, workers=1, progress=False)
    assert (rebuilt.decoded, rebuilt.skipped) == (10, 0)
    assert PreparedCache.open(tmp_path, SIZE).names == [n for n, _ in items[5:15]]


def test_bad_files_are_listed_and_the_rest_cached(items, tmp_path):
    empty = tmp_path / "bad" / "empty_000.png"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    cut = tmp_path / "bad" / "cut_000.png"
    data = items[0][1].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    planted = items[:10] + [("empty_000.png", empty), ("cut_000.png", cut)] + items[10:15]
    report = prepare_cache(planted, tmp_path / "cache", size=SIZE, workers=2, progress=False)
    assert report.decoded == 15 and sorted(report.failed) == ["cut_000.png", "empty_000.png"]
    assert report.failed["empty_000.png"] == "empty file"
    assert "truncated or corrupt" in report.failed["cut_000.png"]
    cache = PreparedCache.open(tmp_path / "cache", SIZE)
    assert cache.failed == report.failed
    assert json.loads((report.cache_dir / "failed.json").read_text()) == report.failed
    assert cache.done.sum() == 15 and not cache.done[10] and not cache.done[11]
    np.testing.assert_array_equal(cache.images[12], resize_gray(read_image(items[10][1]), SIZE))
    with pytest.raises(DatasetError, match=r"image cut_000\.png failed to decode"):
        cache.positions(["cut_000.png"])
    # Fixing the file and re-running decodes only it; failed.json then empties.
    shutil.copy(items[0][1], cut)
    again = prepare_cache(planted, tmp_path / "cache", size=SIZE, workers=1, progress=False)
    assert again.decoded == 1 and again.skipped == 15 and list(again.failed) == ["empty_000.png"]


def test_bad_arguments_and_damaged_caches(items, tmp_path):
    for size in (4, 4096, 64.0):
        with pytest.raises(DatasetError, match="cache size must be between 8 and 2048"):
            prepare_cache(items[:2], tmp_path, size=size)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="workers must be at least 1"):
        prepare_cache(items[:2], tmp_path, size=SIZE, workers=0)
    with pytest.raises(DatasetError, match="unique; repeated: " + items[0][0]):
        prepare_cache([items[0], items[1], items[0]], tmp_path, size=SIZE)
    with pytest.raises(DatasetError, match=r"no prepared cache of 32px; run `chestxray prepare`"):
        PreparedCache.open(tmp_path, 32)
    prepare_cache(items[:4], tmp_path, size=SIZE, workers=1, progress=False)
    (tmp_path / str(SIZE) / "names.txt").write_text("a.png\nb.png\n")
    with pytest.raises(DatasetError, match="cache files disagree"):
        PreparedCache.open(tmp_path, SIZE)


def test_empty_item_list(tmp_path):
    report = prepare_cache([], tmp_path, size=SIZE, progress=False)
    assert (report.total, report.decoded, report.failed) == (0, 0, {})
    assert len(PreparedCache.open(tmp_path, SIZE)) == 0


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CHESTXRAY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "nih"
    root.mkdir()
    # Never inside the dataset root, even when it is writable.
    user = default_cache_dir(root)
    assert user.parent == tmp_path / "xdg" / "chestxray" and user.name.startswith("nih-")
    assert root.resolve() not in user.parents
    monkeypatch.setenv("CHESTXRAY_CACHE", str(tmp_path / "caches"))
    tagged = default_cache_dir(root)
    assert tagged.parent == tmp_path / "caches" and tagged.name == user.name
    other = tmp_path / "b" / "nih"
    other.mkdir(parents=True)
    assert default_cache_dir(other) != tagged  # same folder name, different root


def test_centre_cropped_cache_keeps_the_framing_of_crop_models(tmp_path, original_png):
    """A non-square radiograph (cut to 1024 x 700): the `center` cache holds the centred
    square resized, as a centre-cropping model predicts, beside the whole-image cache."""
    from PIL import Image

    from chestxray.data.transforms import center_crop

    wide = tmp_path / "wide.png"
    Image.fromarray(read_image(original_png)[:700]).save(wide)
    items = [("wide.png", wide)]
    whole = prepare_cache(items, tmp_path / "c", size=SIZE, workers=1, progress=False)
    cropped = prepare_cache(items, tmp_path / "c", size=SIZE, workers=1, progress=False, crop="center")
    assert (whole.cache_dir.name, cropped.cache_dir.name) == (str(SIZE), f"{SIZE}-center")
    image = read_image(wide)
    got = PreparedCache.open(tmp_path / "c", SIZE, "center").images[0]
    assert np.array_equal(got, resize_gray(center_crop(image), SIZE))
    assert not np.array_equal(got, PreparedCache.open(tmp_path / "c", SIZE).images[0])
    with pytest.raises(DatasetError, match="unknown crop 'sideways'"):
        prepare_cache(items, tmp_path / "c", size=SIZE, workers=1, progress=False, crop="sideways")
