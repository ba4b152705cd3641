"""ILSVRC2012 facts the data stages share: archive names and digests, size caps, the devkit's layout,
the checksum side-files, and the manifest's columns.

fetch, verify, pack and synth (the synthetic set generator) all import from here; nothing here does
any work beyond parsing and writing these small formats.

Size caps bound what a hostile or damaged source can make the data stages read into memory or write
to disk. Each is derived from the real dataset, with a wide margin, and named where it is checked:
a violation is a one-line StageError and nothing is kept.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tasks.common import StageError, write_json_atomic

# --- the three archives image-net.org hands a user --------------------------------------------------

TRAIN_TAR = "ILSVRC2012_img_train.tar"          # a plain tar of 1,000 plain tars <wnid>.tar of <wnid>_<n>.JPEG
VAL_TAR = "ILSVRC2012_img_val.tar"              # a plain tar of 50,000 ILSVRC2012_val_NNNNNNNN.JPEG
DEVKIT_TGZ = "ILSVRC2012_devkit_t12.tar.gz"     # gzip-compressed tar: meta.mat, ground truth, MATLAB code
ARCHIVES = (TRAIN_TAR, VAL_TAR, DEVKIT_TGZ)

# The digests image-net.org publishes for the ILSVRC2012 downloads.
OFFICIAL_MD5 = {
    TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e",
    VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
    DEVKIT_TGZ: "fa75699e90414af021442c21a62c3abf",
}
# Sizes of the official files (image-net.org lists them as 138 GB, 6.3 GB and 2.5 MB).
OFFICIAL_SIZE = {TRAIN_TAR: 147_897_477_120, VAL_TAR: 6_744_924_160}

TRAIN_IMAGES, VAL_IMAGES, CLASSES = 1_281_167, 50_000, 1_000
TRAIN_PER_CLASS = (732, 1_300)                  # smallest and largest class of the train set
SPLITS = ("train", "val")

DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_META = "data/meta.mat"                                       # synsets: ILSVRC2012_ID -> WNID, counts
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"  # per val image: its ILSVRC2012_ID
META_MAT = f"{DEVKIT_DIR}/{DEVKIT_META}"
GROUND_TRUTH = f"{DEVKIT_DIR}/{DEVKIT_GROUND_TRUTH}"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")
PNG_AS_JPEG = ("n02105855", "n02105855_2933.JPEG")  # the real train set's PNG saved under a .JPEG name

# --- size caps ------------------------------------------------------------------------------------

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ARCHIVE_CAP = {
    TRAIN_TAR: 160 * GiB,   # the official file is 137.7 GiB; the margin fits a re-tarred copy (pax headers)
    VAL_TAR: 8 * GiB,       # the official file is 6.28 GiB
    DEVKIT_TGZ: 16 * MiB,   # the official file is 2.5 MB
}
# One image. The mean real image is ~115 KB (train: 147,897,477,120 B / 1,281,167 images; val ~135 KB);
# they are compressed photos a few thousand pixels a side at most. 64 MiB is more than even an
# uncompressed 24-bit 4096x4096 bitmap (48 MiB) takes.
IMAGE_CAP = 64 * MiB
# One inner <wnid>.tar of the train archive: at most 1,300 images (the largest class); the mean class
# tar is ~148 MB (147.9 GB / 1,000). 2 GiB is 1,300 images of 1.5 MiB, 13x the mean image.
CLASS_TAR_CAP = 2 * GiB
# The devkit, decompressed: MATLAB code, readme and data files that the 2.5 MB .tar.gz holds.
DEVKIT_UNPACKED_CAP = 64 * MiB
# meta.mat: 1,860 synsets (1,000 leaves + 860 inner), each a few short fields and a gloss sentence.
META_MAT_CAP = 16 * MiB
# What meta.mat may declare: loadmat allocates a cell or struct array from its declared dimensions before it
# reads one element (8 bytes a slot, one per element and field), checks a struct's field names against each other
# (quadratic in their number), and reads nested arrays recursively (on the C stack). The real file is one
# 1,860 x 1 struct of 8 fields (14,880 slots): 14,881 arrays nested 2 deep, none of more than a few hundred elements.
META_MAT_ARRAYS = 1 << 16     # arrays in the file
META_MAT_ELEMENTS = 1 << 20   # elements (struct: elements x fields) one array declares: at most 8 MiB of slots
META_MAT_FIELDS = 64          # fields of one struct
META_MAT_DEPTH = 4            # arrays nested in arrays (loadmat reads them recursively)
# The ground truth: 50,000 lines, each an ILSVRC2012_ID of at most 4 digits: at most 250,000 bytes.
GROUND_TRUTH_CAP = 1 * MiB
# A pax or GNU long-name header's data (tarfile reads it whole): ILSVRC2012 member names are under 40 bytes.
TAR_HEADER_CAP = 1 * MiB


# --- checksum side-files --------------------------------------------------------------------------
# MD5SUMS: md5sum's own format (`<digest>  <name>` or `<digest> *<name>`), what `rn50 synth` writes and
# `rn50 fetch --md5` reads. raw/.<archive>.md5.json: fetch's record of an archive it verified (md5, size,
# mtime_ns), which lets fetch reuse and verify trust the archive without hashing it again.


def read_md5sums(path: Path | str) -> dict[str, str]:
    """Parse md5sum output; every archive must have a digest."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise StageError(f"cannot read MD5 file {path}: {e.strerror}") from None
    out = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 32:
            raise StageError(f"{path}:{n}: not md5sum format: {line!r}")
        out[parts[1].strip().lstrip("*")] = parts[0].lower()
    missing = [a for a in ARCHIVES if a not in out]
    if missing:
        raise StageError(f"{path} has no digest for {', '.join(missing)}")
    return out


def md5sums_text(md5: dict[str, str]) -> str:
    """The md5sum-format text `read_md5sums` reads."""
    return "".join(f"{digest}  {name}\n" for name, digest in md5.items())


def fetch_record_path(raw: Path, name: str) -> Path:
    return raw / f".{name}.md5.json"


def write_fetch_record(raw: Path, name: str, md5: str) -> None:
    """Record that raw/<name> (as it is now: size, mtime) has digest `md5`."""
    st = (raw / name).stat()
    write_json_atomic(fetch_record_path(raw, name), {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def read_fetch_record(raw: Path, name: str) -> dict | None:
    """fetch's record of raw/<name>, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads(fetch_record_path(raw, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


# --- manifest.parquet -----------------------------------------------------------------------------

# One row per image, in this column order, as verify writes it. `path` is extracted/<split>/<wnid>/<file>,
# `label` the class's index among the sorted WNIDs (the same for train and val).
MANIFEST_COLUMNS = ["split", "wnid", "label", "path", "bytes", "md5", "width", "height", "mode", "format",
                    "decodable"]


def manifest_digest(df) -> str:
    """Content digest of a manifest: path, md5, label and split of every image (what pack depends on),
    in path order. The same for a frame of object columns (as read back) and of Arrow-backed columns
    (as verify holds it); rows are taken in slices, never as a sorted copy of the whole frame."""
    h = hashlib.sha256()
    columns = [df[c] for c in ("path", "md5", "label", "split")]
    order = columns[0].reset_index(drop=True).sort_values(kind="stable").index.to_numpy()
    for lo in range(0, len(order), 1 << 16):
        part = order[lo:lo + (1 << 16)]
        rows = zip(*(c.take(part).tolist() for c in columns))
        h.update("".join("\t".join(map(str, row)) + "\n" for row in rows).encode())
    return h.hexdigest()
