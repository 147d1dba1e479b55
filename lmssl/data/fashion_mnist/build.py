"""Rebuild the bundled Fashion-MNIST subset from Debian's ``dataset-fashion-mnist`` package.

Run once by the maintainers, not at import time (needs ``apt-get`` and ``dpkg``; no root):

    python lmssl/data/fashion_mnist/build.py              # fetches the .deb with `apt-get download`
    python lmssl/data/fashion_mnist/build.py --deb X.deb  # or uses one already downloaded

Outputs, next to this script, readable by ``datasets.load_dataset("parquet", ...)`` with the
features kept (``image``: ``datasets.Image``, PNG bytes; ``label``: ``datasets.ClassLabel``):
    train.parquet   20,000 training images: the first 2,000 of each class in file order
    test.parquet    all 10,000 test images, in file order

The idx files are parsed here with numpy. Each 28x28 greyscale image is stored as a lossless
PNG (PIL mode "L", optimize=True). The build is deterministic: the same package and library
versions give byte-identical files. It prints the row and class counts, the file sizes and
sha256s, and the pixel mean/std of the training images, which ``__init__.py`` records as
``MEAN`` and ``STD``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lmssl.data.fashion_mnist import CLASS_NAMES, MEAN, STD, features

HERE = Path(__file__).resolve().parent
PACKAGE = "dataset-fashion-mnist"
IDX_DIR = "usr/share/datasets/fashion-mnist"
PER_CLASS = 2000  # training images kept per class
IDX_DTYPE = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


def read_idx(path: Path) -> np.ndarray:
    """One (gzipped) idx file -> array of its shape, e.g. images (N, 28, 28), labels (N,).

    Format: two zero bytes, one type byte, one byte giving the number of dimensions d,
    then d big-endian uint32 sizes, then the elements in C order."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=IDX_DTYPE[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} elements")
    return data.reshape(shape)


def fetch_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    return next(workdir.glob(f"{PACKAGE}_*.deb"))


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def png_bytes(image: np.ndarray) -> bytes:
    """(28, 28) uint8 -> lossless greyscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, in file order."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))])
    return np.sort(keep)


def write_parquet(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Write with pyarrow, not ``Dataset.to_parquet``: that one stores image bytes
    uncompressed (for the Hub's chunk deduplication), while zstd here removes the PNG
    headers that every image repeats (about 10% of the file). The schema is the one
    ``datasets`` derives from the features, so its ``huggingface`` metadata carries them."""
    schema = features().arrow_schema
    table = pa.table({
        "image": pa.array([{"bytes": png_bytes(im), "path": None} for im in images], type=schema.field("image").type),
        "label": pa.array(labels.astype(np.int64), type=schema.field("label").type),
    }, schema=schema)
    pq.write_table(table, path, compression="zstd", compression_level=19, use_dictionary=["label"],
                   write_statistics=["label"])


def check_round_trip(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Reload ``path`` with ``datasets`` the way lmssl does; the features must come back from
    the parquet schema metadata and every image must decode to its original pixels."""
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={"data": str(path)}, split="data")
    if ds.features != features():
        raise RuntimeError(f"{path.name}: features not kept: {ds.features}")
    if ds["label"][:] != labels.tolist():
        raise RuntimeError(f"{path.name}: labels differ after reload")
    decoded = np.stack([np.asarray(im) for im in ds["image"]])
    if decoded.dtype != np.uint8 or not np.array_equal(decoded, images):
        raise RuntimeError(f"{path.name}: pixels differ after reload")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE}_*.deb (default: apt-get download it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb.resolve() if args.deb else fetch_deb(tmp)
        subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True)
        idx = tmp / "root" / IDX_DIR
        train_x = read_idx(idx / "train-images-idx3-ubyte.gz")
        train_y = read_idx(idx / "train-labels-idx1-ubyte.gz")
        test_x = read_idx(idx / "t10k-images-idx3-ubyte.gz")
        test_y = read_idx(idx / "t10k-labels-idx1-ubyte.gz")
        print(f"{PACKAGE} {deb_version(deb)}: train {train_x.shape}, test {test_x.shape}")
    keep = balanced_subset(train_y, PER_CLASS)
    splits = {"train": (train_x[keep], train_y[keep]), "test": (test_x, test_y)}
    for split, (x, y) in splits.items():
        path = HERE / f"{split}.parquet"
        write_parquet(x, y, path)
        check_round_trip(path, x, y)
        counts = np.bincount(y, minlength=len(CLASS_NAMES)).tolist()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path.name}: {len(y)} rows, per class {counts}, {path.stat().st_size} bytes, sha256 {digest}")
    pixels = splits["train"][0].astype(np.float64) / 255.0
    mean, std = round(float(pixels.mean()), 6), round(float(pixels.std()), 6)
    print(f"train pixels in [0, 1]: MEAN = ({mean},)  STD = ({std},)")
    if (mean,) != MEAN or (std,) != STD:
        print(f"update MEAN and STD in {HERE / '__init__.py'} (they say {MEAN}, {STD})")


if __name__ == "__main__":
    main()
