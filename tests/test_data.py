"""Tests of fnbp/data.py: the loaders, the IDX reader and the mini-batching."""

import contextlib
import gzip
import io
import signal
import struct
import time
import tracemalloc
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import idx_bytes, write_file, write_mnist
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fnbp import data
from fnbp.initializers import init_params
from fnbp.model import MLP, forward

# ----------------------------------------------------------------------------------------------
# load_digits


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


def test_digits_default_split_is_1437_train_360_test_of_64_features(digits):
    assert digits.x_train.shape == (1437, 64)
    assert digits.y_train.shape == (1437,)
    assert digits.x_test.shape == (360, 64)
    assert digits.y_test.shape == (360,)
    assert digits.num_features == 64 and digits.num_outputs == 10 and digits.num_classes == 10


def test_digits_dtypes_are_float32_inputs_and_int32_labels(digits):
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32


def test_digits_values_are_finite(digits):
    assert np.all(np.isfinite(digits.x_train)) and np.all(np.isfinite(digits.x_test))


def test_digits_split_is_stratified_with_every_class_in_both_splits(digits):
    train_counts = np.bincount(digits.y_train, minlength=10)
    test_counts = np.bincount(digits.y_test, minlength=10)
    assert len(train_counts) == 10 and len(test_counts) == 10
    assert np.all(train_counts > 0) and np.all(test_counts > 0)
    class_counts = train_counts + test_counts
    # Stratification: each class contributes its own 20% (rounded) to the test split.
    assert np.all(np.abs(test_counts - 0.2 * class_counts) <= 1), (test_counts, class_counts)


def _assert_train_centred_and_scaled_by_one_train_factor(ds, raw_train, raw_test):
    """x = (raw − mean_train) / s for both splits, with mean_train per feature, one scale s."""
    mean = raw_train.mean(0)
    centred_tr, centred_te = raw_train - mean, raw_test - mean
    x_tr, x_te = ds.x_train.astype(np.float64), ds.x_test.astype(np.float64)
    s = np.sum(x_tr * centred_tr) / np.sum(x_tr * x_tr)  # least-squares single scale
    assert s > 0
    # Only the final float32 cast separates the two sides: ~6e-8 of values of order 1-10.
    np.testing.assert_allclose(x_tr * s, centred_tr, rtol=1e-5, atol=1e-5 * s)
    np.testing.assert_allclose(x_te * s, centred_te, rtol=1e-5, atol=1e-5 * s)


def test_digits_training_set_is_centred_per_feature(digits):
    # float32 rounding of values of order 1 over 1437 rows: means of ~1e-7, far below 1e-5.
    np.testing.assert_allclose(digits.x_train.mean(0), 0.0, atol=1e-5)
    # One scale for all pixels (not a per-pixel std): per-pixel stds are far from all equal.
    assert np.ptp(digits.x_train.std(0)) > 0.5


def test_digits_training_set_has_unit_overall_std(digits):
    np.testing.assert_allclose(digits.x_train.std(dtype=np.float64), 1.0, rtol=1e-5)


def test_digits_both_splits_are_standardized_with_training_statistics(digits):
    """x_test uses the training mean and scale, not its own statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    np.testing.assert_array_equal(digits.y_train, y_tr)
    np.testing.assert_array_equal(digits.y_test, y_te)
    _assert_train_centred_and_scaled_by_one_train_factor(digits, x_tr, x_te)
    # The test split's own per-feature means are visibly not zero.
    assert np.max(np.abs(digits.x_test.mean(0))) > 1e-2


def test_digits_same_seed_gives_identical_arrays(digits):
    again = data.load_digits(seed=0)
    for a, b in zip(digits[1:5], again[1:5], strict=True):
        np.testing.assert_array_equal(a, b)


def test_digits_different_seed_gives_a_different_split(digits):
    other = data.load_digits(seed=1)
    assert other.x_test.shape == digits.x_test.shape
    assert not np.array_equal(other.y_test, digits.y_test)
    assert not np.array_equal(other.x_test, digits.x_test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_digits_rejects_test_fraction_outside_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=fraction)


# ----------------------------------------------------------------------------------------------
# load_mnist1d


@pytest.fixture(scope="module")
def mnist1d():
    state = np.random.get_state()
    ds = data.load_mnist1d()
    return ds, state, np.random.get_state()


def test_mnist1d_default_is_4000_train_1000_test_of_40_features(mnist1d):
    ds, _, _ = mnist1d
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_outputs == 10


def test_mnist1d_labels_are_the_ten_classes(mnist1d):
    ds, _, _ = mnist1d
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert set(np.unique(ds.y_test)) == set(range(10))


def test_mnist1d_leaves_numpy_global_rng_state_unchanged(mnist1d):
    _, before, after = mnist1d
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])  # the Mersenne-Twister key
    assert before[2:] == after[2:]


def test_mnist1d_is_reproducible_by_seed():
    a = data.load_mnist1d(seed=3, num_samples=200)
    b = data.load_mnist1d(seed=3, num_samples=200)
    c = data.load_mnist1d(seed=4, num_samples=200)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    for u, v in zip(a[1:5], b[1:5], strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.x_train, c.x_train)


def test_mnist1d_rejects_fewer_than_20_samples():
    with pytest.raises(ValueError, match="num_samples"):
        data.load_mnist1d(num_samples=19)


# ----------------------------------------------------------------------------------------------
# IDX files and load_mnist


def _mnist_arrays():
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y_tr = (np.arange(12) * 7 % 10).astype(np.uint8)
    y_te = np.array([9, 0, 3, 3, 1, 8], np.uint8)
    return x_tr, y_tr, x_te, y_te


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_back_uint8_images(tmp_path, suffix):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 5
    out = data.read_idx(write_file(tmp_path / f"a{suffix}", idx_bytes(arr)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "code, be, native",
    [
        (0x09, ">i1", np.int8),
        (0x0B, ">i2", np.int16),
        (0x0C, ">i4", np.int32),
        (0x0D, ">f4", np.float32),
        (0x0E, ">f8", np.float64),
    ],
)
def test_read_idx_decodes_big_endian_dtypes_to_native_order(tmp_path, code, be, native):
    arr = np.array([[-3, 2, 100], [7, -100, 0]], native)
    out = data.read_idx(write_file(tmp_path / "a", idx_bytes(arr, code, be)))
    assert out.dtype == np.dtype(native) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_load_mnist_reads_images_as_784_standardized_features_and_labels(tmp_path):
    x_tr, y_tr, x_te, y_te = arrays = _mnist_arrays()
    ds = data.load_mnist(write_mnist(tmp_path / "mnist", arrays))
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (6, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    flat_tr = x_tr.reshape(12, -1) / 255.0
    flat_te = x_te.reshape(6, -1) / 255.0
    _assert_train_centred_and_scaled_by_one_train_factor(ds, flat_tr, flat_te)
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-5)


def test_load_mnist_gz_files_give_the_same_dataset_as_plain_files(tmp_path):
    arrays = _mnist_arrays()
    plain = data.load_mnist(write_mnist(tmp_path / "plain", arrays))
    gz = data.load_mnist(write_mnist(tmp_path / "gz", arrays, suffix=".gz"))
    for a, b in zip(plain[1:5], gz[1:5], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "payload, match",
    [
        (bytes([1, 0, 8, 1]) + struct.pack(">I", 3) + b"abc", "bad magic"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 3) + b"abc", "dtype code 0x07"),
        (bytes([0, 0, 8, 0]), "dimension count"),
        (bytes([0, 0, 8, 5]) + struct.pack(">5I", 1, 1, 1, 1, 1) + b"a", "dimension count"),
        (bytes([0, 0, 8, 2]) + struct.pack(">I", 3), "truncated IDX header"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"x" * 9, "10 bytes"),  # truncated data
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"x" * 11, "10 bytes"),  # trailing data
        (bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 3) + b"x" * 5, "6 bytes"),  # half an int16
        (b"\0\0", "bad magic"),
    ],
    ids=[
        "magic",
        "dtype",
        "ndim0",
        "ndim5",
        "short-header",
        "truncated",
        "trailing",
        "odd",
        "tiny",
    ],
)
def test_read_idx_rejects_malformed_file_naming_the_path(tmp_path, suffix, payload, match):
    path = write_file(tmp_path / f"bad-file{suffix}", payload)
    with pytest.raises(ValueError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_forged_huge_header_raises_value_error_quickly(tmp_path, suffix):
    payload = bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**31, 2**31) + b"\0" * 16
    path = write_file(tmp_path / f"huge{suffix}", payload)
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_forged_header_does_not_allocate_what_it_claims(tmp_path, suffix):
    # A claimed 2**14 x 2**14 uint8 array is 256 MiB: allocatable, so an implementation that
    # trusted the header would show it in the peak; the file holds 16 bytes.
    payload = bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**14, 2**14) + b"\0" * 16
    path = write_file(tmp_path / f"big{suffix}", payload)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak} bytes"


def test_read_idx_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-idx"):
        data.read_idx(tmp_path / "nope-idx")


def test_load_mnist_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        data.load_mnist(tmp_path / "no-such-folder")


def test_load_mnist_missing_file_raises_file_not_found_naming_it(tmp_path):
    folder = write_mnist(tmp_path / "mnist", _mnist_arrays())
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        data.load_mnist(folder)


def test_load_mnist_mismatched_image_and_label_counts_raise(tmp_path):
    x_tr, y_tr, x_te, y_te = _mnist_arrays()
    folder = write_mnist(tmp_path / "mnist", (x_tr, y_tr[:11], x_te, y_te))
    with pytest.raises(ValueError, match="MNIST train"):
        data.load_mnist(folder)


def test_load_mnist_label_10_raises(tmp_path):
    x_tr, y_tr, x_te, y_te = _mnist_arrays()
    y_te = y_te.copy()
    y_te[2] = 10
    folder = write_mnist(tmp_path / "mnist", (x_tr, y_tr, x_te, y_te))
    with pytest.raises(ValueError, match=r"0\.\.9, got 0\.\.10"):
        data.load_mnist(folder)


def test_load_mnist_images_with_wrong_rank_raise(tmp_path):
    x_tr, y_tr, x_te, y_te = _mnist_arrays()
    folder = write_mnist(tmp_path / "mnist", (x_tr.reshape(12, 784), y_tr, x_te, y_te))
    with pytest.raises(ValueError, match="images of shape"):
        data.load_mnist(folder)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dims=(1, 2**31), claim_only=True), "forged header"),
        (dict(dims=(5,), corrupt_stream=True), "corrupt stream"),
    ],
)
def test_read_idx_gz_errors_are_value_errors_naming_the_file(tmp_path, kwargs, name):
    dims = kwargs["dims"]
    head = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    packed = gzip.compress(head + bytes(range(5)))
    if kwargs.get("corrupt_stream"):
        # The first deflate byte (after the 10-byte gzip header) set to 0xff is a block of the
        # reserved type 3: zlib raises zlib.error, which is not an OSError.
        packed = packed[:10] + b"\xff" + packed[11:]
        with pytest.raises(zlib.error):
            gzip.decompress(packed)
    path = tmp_path / "f.gz"
    path.write_bytes(packed)
    with pytest.raises(ValueError) as e:
        data.read_idx(path)
    assert str(path) in str(e.value), name


@pytest.mark.parametrize(
    "change, match",
    [
        ("no test images", "t10k-images-idx3-ubyte: holds no examples"),
        ("rows of width 0", r"images of shape \(12, 0, 28\) .* at least 1"),
        ("5x5 test images", r"train images are \(28, 28\) but test images are \(5, 5\)"),
        ("float labels", "labels must be integers, got dtype float32"),
        ("NaN label", "train-labels-idx1-ubyte: holds 1 NaN or Inf values"),
    ],
)
def test_load_mnist_rejects_valid_idx_files_that_are_not_mnist(tmp_path, change, match):
    x_tr, y_tr, x_te, y_te = _mnist_arrays()
    if change == "no test images":
        x_te, y_te = x_te[:0], y_te[:0]
    elif change == "rows of width 0":
        x_tr = x_tr[:, :0]
    elif change == "5x5 test images":
        x_te = x_te[:, :5, :5]
    folder = write_mnist(tmp_path / "mnist", (x_tr, y_tr, x_te, y_te))
    if change in ("float labels", "NaN label"):  # NaN would become int32 -2147483648
        labels = np.array([np.nan if change == "NaN label" else 0.0] + [1.0] * 11, np.float32)
        write_file(folder / "train-labels-idx1-ubyte", idx_bytes(labels, 0x0D, ">f4"))
    with pytest.raises(ValueError, match=match):
        data.load_mnist(folder)


# ----------------------------------------------------------------------------------------------
# Hostile IDX files: gzip bombs, random and mutated bytes.


def _zeros_gz(path, head: bytes, zeros: int) -> int:
    """Write ``head`` and ``zeros`` zero bytes as a gzip file, streaming (zeros compress
    ~1000:1, so nothing large is ever held). Returns the compressed size."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    chunk = bytes(2**20)
    with open(path, "wb") as f:
        f.write(packer.compress(head))
        for start in range(0, zeros, len(chunk)):
            f.write(packer.compress(chunk[: min(len(chunk), zeros - start)]))
        f.write(packer.flush())
    return path.stat().st_size


def _peak_bytes_of(fn):
    """``(result or exception, peak traced bytes, seconds)`` of ``fn()``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # returned for the caller to judge
        out = e
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, peak, seconds


def test_read_idx_gzip_bomb_claiming_more_than_max_bytes_is_refused_before_decompressing(
    tmp_path,
):
    # 64 MiB of zeros in ~65 KB, behind a header claiming 2**20 × 2**20 bytes (1 TiB).
    path = tmp_path / "bomb.gz"
    head = bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**20, 2**20)
    assert _zeros_gz(path, head, 64 * 2**20) < 2**17
    out, peak, seconds = _peak_bytes_of(lambda: data.read_idx(path))
    assert isinstance(out, ValueError) and str(path) in str(out)
    assert "max_bytes=2147483648" in str(out) and "pass a larger max_bytes" in str(out)
    assert peak < 2**20 and seconds < 1.0


def test_read_idx_gzip_bomb_longer_than_its_header_is_decompressed_only_to_the_claim(tmp_path):
    # The header claims 2 MiB, honestly under max_bytes; the stream decompresses to 64 MiB.
    # Reading stops one byte past the claim, so memory follows the claim, not the stream.
    path = tmp_path / "bomb.gz"
    head = bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**10, 2**11)
    _zeros_gz(path, head, 64 * 2**20)
    out, peak, seconds = _peak_bytes_of(lambda: data.read_idx(path))
    assert isinstance(out, ValueError) and str(path) in str(out)
    assert "(2097152 bytes) but the file holds 2097153+ bytes" in str(out)
    assert peak < 3 * 2**21 + 2**20 and seconds < 1.0  # the read chunks, joined once


def test_read_idx_max_bytes_caps_the_claimed_size_and_can_be_raised(tmp_path):
    path = tmp_path / "zeros.gz"
    _zeros_gz(path, bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**10, 2**11), 2**21)
    with pytest.raises(ValueError, match=r"\(2097152 bytes\), more than max_bytes=1048576"):
        data.read_idx(path, max_bytes=2**20)
    out = data.read_idx(path, max_bytes=2**21)  # exactly the claim is allowed
    assert out.shape == (2**10, 2**11) and not out.any()
    plain = write_file(tmp_path / "plain", idx_bytes(np.zeros((4, 4), np.uint8)))
    with pytest.raises(ValueError, match="more than max_bytes=15"):
        data.read_idx(plain, max_bytes=15)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2**31", None])
def test_read_idx_rejects_a_max_bytes_that_is_not_a_positive_int(tmp_path, bad):
    path = write_file(tmp_path / "a", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        data.read_idx(path, max_bytes=bad)


def test_load_mnist_passes_max_bytes_to_every_file(tmp_path):
    folder = write_mnist(tmp_path / "mnist", _mnist_arrays())
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*max_bytes=9000"):
        data.load_mnist(folder, max_bytes=9000)  # the training images hold 12·784 bytes
    assert data.load_mnist(folder, max_bytes=12 * 784).x_train.shape == (12, 784)


_SEED_ARRAYS = [
    (np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 0x08, ">u1"),
    (np.array([[-3, 2, 300], [7, -100, 0]], np.int16), 0x0B, ">i2"),
    (np.array([1.5, -2.0, np.pi], np.float64), 0x0E, ">f8"),
]


@st.composite
def _mutations(draw, payload: bytes) -> bytes:
    """1 to 4 random overwrites, truncations and insertions of bytes."""
    out = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["overwrite", "truncate", "insert"]))
        at = draw(st.integers(0, len(out)))
        if kind == "overwrite" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del out[at:]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


@st.composite
def _hostile_idx_files(draw):
    """``(suffix, file bytes)``: random bytes, or a valid IDX file (plain or gzip) with its
    IDX bytes or its gzip stream mutated."""
    gz = draw(st.booleans())
    if draw(st.integers(0, 4)) == 0:
        return (".gz" if gz else ""), draw(st.binary(max_size=200))
    arr, code, be = draw(st.sampled_from(_SEED_ARRAYS))
    payload = idx_bytes(arr, code, be)
    if not gz:
        return "", draw(_mutations(payload))
    if draw(st.booleans()):  # mutate the stream itself: corrupt deflate blocks, header, CRC
        return ".gz", draw(_mutations(gzip.compress(payload, mtime=0)))
    return ".gz", gzip.compress(draw(_mutations(payload)), mtime=0)


def _decompressed(packed: bytes) -> bytes | None:
    """What the gzip stream holds, or None if it is corrupt."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as f:
            return f.read()
    except (OSError, EOFError, zlib.error):
        return None


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Turn a hang into a TimeoutError (Unix: SIGALRM; elsewhere the elapsed time is checked
    afterwards only)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=400)
@given(_hostile_idx_files())
def test_read_idx_on_random_and_mutated_files_returns_what_the_header_says_or_raises_value_error(
    fuzz_dir, case
):
    """Either the array of the header's dims holding exactly the file's data bytes, or a
    ValueError naming the file; never another exception, never more than 2 s, and never
    memory beyond a few times the bytes actually present (whatever the header claims)."""
    suffix, raw = case
    path = fuzz_dir / f"hostile-idx{suffix}"
    path.write_bytes(raw)
    with _time_limit(2.0):
        out, peak, seconds = _peak_bytes_of(lambda: data.read_idx(path))
    assert seconds < 2.0
    payload = _decompressed(raw) if suffix == ".gz" else raw
    event(type(out).__name__)
    if isinstance(out, Exception):
        assert isinstance(out, ValueError), f"{type(out).__name__}: {out}"
        assert str(path) in str(out)
    else:
        assert payload is not None, "read_idx accepted a stream that does not decompress"
        ndim = payload[3]
        dims = struct.unpack(f">{ndim}I", payload[4 : 4 + 4 * ndim])
        assert out.shape == dims
        big_endian = out.dtype.newbyteorder(">")
        assert out.astype(big_endian).tobytes() == payload[4 + 4 * ndim :]
    # The bytes present: the plain file, or what the stream decompresses to (at most ~1000
    # times its size; these streams are under 1 KB), plus the read buffer and gzip's own.
    present = len(payload) if payload is not None else 1032 * len(raw)
    assert peak <= 3 * present + 2**21, f"peak {peak} bytes for {present} bytes present"


@settings(max_examples=200)
@given(
    which=st.integers(0, 3),
    suffix=st.sampled_from(["", ".gz"]),
    data_=st.data(),
)
def test_load_mnist_with_a_mutated_file_raises_only_value_error_or_loads(
    fuzz_dir, which, suffix, data_
):
    # Images with structure, so that gzip writes Huffman-coded blocks (not the stored blocks
    # of random bytes) and a mutated stream can break them.
    _, y_tr, _, y_te = _mnist_arrays()
    x_tr = (np.arange(12 * 28 * 28) % 17).astype(np.uint8).reshape(12, 28, 28)
    arrays = (x_tr, y_tr, x_tr[:6] * 3, y_te)
    folder = fuzz_dir / "hostile-folder"
    for old in folder.glob("*") if folder.exists() else []:
        old.unlink()
    write_mnist(folder, arrays, suffix)
    target = sorted(folder.iterdir())[which]
    raw = target.read_bytes()
    if suffix and data_.draw(st.booleans()):
        mutated = gzip.compress(data_.draw(_mutations(gzip.decompress(raw))), mtime=0)
    else:
        mutated = data_.draw(_mutations(raw))
    target.write_bytes(mutated)
    try:
        with _time_limit(5.0):
            ds = data.load_mnist(folder)
    except (ValueError, FileNotFoundError) as e:
        event("ValueError")
        assert str(target) in str(e) or str(e).lower().startswith("mnist"), str(e)
    else:
        event("loaded")
        assert ds.x_train.shape[1] == ds.x_test.shape[1]
        assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
        assert ds.y_train.min() >= 0 and ds.y_train.max() <= 9
        assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()


# ----------------------------------------------------------------------------------------------
# teacher_student


def test_teacher_student_shapes_and_dtypes():
    ds = data.teacher_student(jax.random.key(0), sizes=(5, 7, 3), n_train=30, n_test=11)
    assert ds.x_train.shape == (30, 5) and ds.x_test.shape == (11, 5)
    assert ds.y_train.shape == (30, 3) and ds.y_test.shape == (11, 3)
    assert all(v.dtype == np.float32 for v in ds[1:5])
    assert ds.num_classes is None and ds.num_outputs == 3 and ds.num_features == 5


def test_teacher_student_is_reproducible_by_key():
    a = data.teacher_student(jax.random.key(4), n_train=20, n_test=10)
    b = data.teacher_student(jax.random.key(4), n_train=20, n_test=10)
    c = data.teacher_student(jax.random.key(5), n_train=20, n_test=10)
    for u, v in zip(a[1:5], b[1:5], strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.x_train, c.x_train)
    assert not np.array_equal(a.y_train, c.y_train)


def test_teacher_student_noise_adds_unit_gaussian_times_noise():
    """Same key, noise 0 versus 0.1: same inputs, and targets that differ by 0.1·N(0, 1)."""
    key = jax.random.key(1)
    kw = dict(sizes=(8, 16, 2), n_train=3000, n_test=1000)
    clean = data.teacher_student(key, noise=0.0, **kw)
    noisy = data.teacher_student(key, noise=0.1, **kw)
    np.testing.assert_array_equal(clean.x_train, noisy.x_train)
    diff = np.concatenate([noisy.y_train - clean.y_train, noisy.y_test - clean.y_test])
    # 8000 draws: the sample std of 0.1·ε is within ~1% of 0.1, the mean within ~0.004.
    assert abs(diff.std() - 0.1) < 0.01
    assert abs(diff.mean()) < 0.01
    # The teacher's outputs are not trivial (a zero teacher would make this test vacuous).
    assert clean.y_train.std() > 0.3


def test_teacher_student_noise_zero_targets_are_teacher_forward():
    """With noise 0, y = teacher(x) exactly, the teacher drawn as the code does it today
    (key split in three: teacher, inputs, noise; LeCun normal; identity output)."""
    key = jax.random.key(2)
    sizes = (6, 9, 2)
    ds = data.teacher_student(key, sizes=sizes, activation="tanh", n_train=17, n_test=5, noise=0.0)
    k_teacher, k_x, _ = jax.random.split(key, 3)
    teacher = MLP(sizes, "tanh", "mse")
    params = init_params(k_teacher, teacher, "lecun_normal")
    x = np.concatenate([ds.x_train, ds.x_test])
    np.testing.assert_array_equal(x, np.asarray(jax.random.normal(k_x, (22, 6))))
    y = np.concatenate([ds.y_train, ds.y_test])
    np.testing.assert_array_equal(y, np.asarray(forward(params, teacher, jnp.asarray(x))))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n_train=0), "n_train"), (dict(n_test=0), "n_test"), (dict(noise=-0.1), "noise")],
)
def test_teacher_student_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.teacher_student(jax.random.key(0), **kwargs)


# ----------------------------------------------------------------------------------------------
# epoch_batches and batches


def _toy(n=23):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n, dtype=np.int32)
    return x, y


@pytest.mark.parametrize("batch_size", [1, 4, 5, 23])
def test_batches_with_drop_remainder_equal_epoch_batches(batch_size):
    x, y = _toy()
    key = jax.random.key(7)
    xb, yb = data.epoch_batches(key, jnp.asarray(x), jnp.asarray(y), batch_size)
    listed = list(data.batches(key, x, y, batch_size, drop_remainder=True))
    assert xb.shape == (23 // batch_size, batch_size, 2) and yb.shape == xb.shape[:2]
    assert len(listed) == 23 // batch_size
    np.testing.assert_array_equal(np.stack([b[0] for b in listed]), xb)
    np.testing.assert_array_equal(np.stack([b[1] for b in listed]), yb)


def test_epoch_batches_pairs_rows_and_uses_each_example_at_most_once():
    x, y = _toy()
    xb, yb = data.epoch_batches(jax.random.key(0), jnp.asarray(x), jnp.asarray(y), 5)
    assert xb.shape == (4, 5, 2)
    ids = np.asarray(yb).ravel()
    assert len(np.unique(ids)) == 20  # 20 distinct of 23; 3 sit out
    np.testing.assert_array_equal(np.asarray(xb).reshape(20, 2), x[ids])  # rows stay paired


def test_epoch_batches_works_inside_jit():
    x, y = _toy()
    f = jax.jit(lambda k, x, y: data.epoch_batches(k, x, y, 4))
    xb, yb = f(jax.random.key(3), jnp.asarray(x), jnp.asarray(y))
    eager = data.epoch_batches(jax.random.key(3), jnp.asarray(x), jnp.asarray(y), 4)
    np.testing.assert_array_equal(xb, eager[0])
    np.testing.assert_array_equal(yb, eager[1])


def test_batches_without_drop_remainder_cover_every_example_once():
    x, y = _toy()
    listed = list(data.batches(jax.random.key(1), x, y, 5, drop_remainder=False))
    assert [len(b[1]) for b in listed] == [5, 5, 5, 5, 3]
    ids = np.concatenate([b[1] for b in listed])
    np.testing.assert_array_equal(np.sort(ids), y)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in listed]), x[ids])


def test_different_keys_give_different_orders():
    x, y = _toy()
    a = np.asarray(data.epoch_batches(jax.random.key(0), jnp.asarray(x), jnp.asarray(y), 23)[1])
    b = np.asarray(data.epoch_batches(jax.random.key(1), jnp.asarray(x), jnp.asarray(y), 23)[1])
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a.ravel()), np.sort(b.ravel()))
    c = np.concatenate([b[1] for b in data.batches(jax.random.key(2), x, y, 23)])
    d = np.concatenate([b[1] for b in data.batches(jax.random.key(3), x, y, 23)])
    assert not np.array_equal(c, d)


def test_epoch_batches_rejects_batch_size_larger_than_n():
    x, y = _toy()
    with pytest.raises(ValueError, match="exceeds"):
        data.epoch_batches(jax.random.key(0), jnp.asarray(x), jnp.asarray(y), 24)


def test_epoch_batches_rejects_batch_size_zero():
    x, y = _toy()
    with pytest.raises(ValueError):
        data.epoch_batches(jax.random.key(0), jnp.asarray(x), jnp.asarray(y), 0)


def test_batches_rejects_batch_size_larger_than_n():
    x, y = _toy()
    with pytest.raises(ValueError):
        list(data.batches(jax.random.key(0), x, y, 24))


@pytest.mark.parametrize("batch_size", [0, -1, 2.0])
def test_batches_rejects_non_positive_int_batch_size(batch_size):
    x, y = _toy()
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(jax.random.key(0), x, y, batch_size))


def test_batches_rejects_mismatched_row_counts():
    x, y = _toy()
    with pytest.raises(ValueError, match="23 rows but y has 22"):
        list(data.batches(jax.random.key(0), x, y[:22], 5))


# ----------------------------------------------------------------------------------------------
# finiteness check


@pytest.mark.parametrize("field", ["x_train", "x_test"])
def test_finite_check_names_the_field_holding_nan(field):
    x, y = _toy(4)
    arrays = {"x_train": x.copy(), "y_train": y, "x_test": x.copy(), "y_test": y}
    arrays[field][1, 0] = np.nan
    arrays[field][2, 1] = np.inf
    ds = data.Dataset(
        "toy", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], 10
    )
    with pytest.raises(ValueError, match=f"toy: {field} holds 2 NaN or Inf"):
        data._finite("toy", ds)


def test_finite_check_rejects_empty_split_and_passes_clean_data():
    x, y = _toy(4)
    ds = data.Dataset("toy", x, y, x, y, 10)
    assert data._finite("toy", ds) is ds
    with pytest.raises(ValueError, match="y_test is empty"):
        data._finite("toy", ds._replace(x_test=x, y_test=y[:0]))
