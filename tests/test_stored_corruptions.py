"""Generated corrupted sets stored once and read back: byte-equal to generating them, keyed so that other images or
other code never get them, and a damaged or unwritable cache costs time, never a trial."""
import numpy as np
import pytest

import stress.corruptions as corruptions
from stress.corruptions import CORRUPTIONS, SEVERITIES, corrupted_sets
from stress.corruptions import stored
from stress.corruptions.stored import SetCache

X = np.random.default_rng(7).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
ALL = len(CORRUPTIONS) * len(SEVERITIES)


@pytest.fixture(scope="module")
def generated():
    """Every set of ``X``, generated without a cache: the reference a read-back set must equal."""
    return {(name, s): images for name, s, images in corrupted_sets(X)}


def forbid_generating(monkeypatch):
    """Make generating a set fail, so a test knows the sets it got were read from the cache."""
    def fail(*args, **kwargs):
        raise AssertionError("a set was generated although it was stored")
    monkeypatch.setattr(corruptions, "corrupt", fail)


def test_the_first_call_stores_every_set_and_a_second_reads_them_back_byte_equal(tmp_path, monkeypatch, generated):
    first = SetCache(tmp_path, X, seed=0)
    assert {(n, s): im.tobytes() for n, s, im in corrupted_sets(X, cache=first)} == {k: v.tobytes() for k, v in generated.items()}
    assert first.record() == {"folder": str(first.folder), "read": 0, "stored": ALL}
    assert len(list(first.folder.glob("*.npy"))) == ALL and not list(first.folder.glob("*.tmp"))
    assert first.folder.parent == tmp_path / "corruptions"

    forbid_generating(monkeypatch)
    second = SetCache(tmp_path, X, seed=0)
    again = {(n, s): im for n, s, im in corrupted_sets(X, cache=second)}
    assert second.record()["read"] == ALL and second.record()["stored"] == 0
    for key, images in generated.items():
        assert again[key].dtype == np.uint8 and np.array_equal(again[key], images), key


def test_other_images_another_seed_or_other_code_get_another_folder(tmp_path, monkeypatch):
    base = SetCache(tmp_path, X, seed=0).folder
    changed = X.copy()
    changed[0, 0, 0, 0] ^= 1  # one pixel's lowest bit
    assert SetCache(tmp_path, changed, seed=0).folder != base
    assert SetCache(tmp_path, X, seed=1).folder != base
    assert SetCache(tmp_path, X[:2], seed=0).folder != base
    versions = stored.library_versions()
    monkeypatch.setattr(stored, "library_versions", lambda: {**versions, "scipy": "0.0.1"})
    assert stored.code_version.__wrapped__() != stored.code_version()  # a new SciPy: a new key


def test_a_damaged_set_is_generated_again_with_a_warning_and_replaced(tmp_path, capsys, generated):
    list(corrupted_sets(X, cache=SetCache(tmp_path, X, seed=0)))
    cache = SetCache(tmp_path, X, seed=0)
    fog = cache.folder / "fog-3.npy"
    fog.write_bytes(fog.read_bytes()[:200])  # truncated, as by a full disk
    np.save(cache.folder / "snow-1.npy", np.zeros((2, 3, 32, 32), np.uint8))  # another batch's shape
    again = {(n, s): im for n, s, im in corrupted_sets(X, cache=cache)}
    err = capsys.readouterr().err
    assert f"{fog} is unreadable" in err and f"{cache.folder / 'snow-1.npy'} is unreadable (shape (2, 3, 32, 32)" in err
    assert cache.record()["read"] == ALL - 2 and cache.record()["stored"] == 2
    assert np.array_equal(again["fog", 3], generated["fog", 3]) and np.array_equal(np.load(fog), generated["fog", 3])
    assert np.array_equal(np.load(cache.folder / "snow-1.npy"), generated["snow", 1])


def test_a_cache_that_cannot_be_written_warns_once_and_the_sets_are_still_generated(tmp_path, capsys, generated):
    (tmp_path / "corruptions").write_text("a file where the cache's folder should be")
    cache = SetCache(tmp_path, X, seed=0)
    sets = {(n, s): im for n, s, im in corrupted_sets(X, cache=cache)}
    err = capsys.readouterr().err
    assert err.count("cannot store corrupted sets under") == 1 and "generated without a cache" in err
    assert cache.record()["stored"] == 0 and all(np.array_equal(sets[k], v) for k, v in generated.items())


def test_a_cache_of_another_seed_is_refused():
    with pytest.raises(ValueError, match="a SetCache of seed 1 for the sets of seed 0"):
        next(corrupted_sets(X, seed=0, cache=SetCache("unused", X, seed=1)))
