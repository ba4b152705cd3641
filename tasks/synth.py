"""A synthetic ILSVRC2012 with the real archive layout, its quirks, and learnable images.

Layout written to OUT (what image-net.org hands a user, plus an MD5SUMS):
  ILSVRC2012_img_train.tar      one inner <wnid>.tar per class holding <wnid>_<n>.JPEG
  ILSVRC2012_img_val.tar        flat ILSVRC2012_val_%08d.JPEG
  ILSVRC2012_devkit_t12.tar.gz  ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}
  MD5SUMS                       md5sum format

As in the real devkit, ILSVRC2012_IDs are not in sorted-WNID order, meta.mat also holds non-leaf synsets,
and num_train_images says how many train images each class has. Quirks of the real train set are
reproduced: one PNG saved as .JPEG (n02105855_2933.JPEG), CMYK JPEGs, grayscale JPEGs. As in the real
validation set, one image is mislabelled (with two classes or more): the ground truth of the last one names
the next class. So top-1 stays below 1.0, which the MLPerf checker refuses as implausible.

A class is a hue and a stripe orientation/frequency; each image adds its own size, phase, brightness
and noise, so a small convnet separates the classes but has to learn to.

Two profiles (`profile=`, `rn50 synth --profile`):
- "small" (the default; the demo and the unit tests): 64-112 px a side, ~4 KB JPEGs, one process.
- "imagenet" (the data-path benchmarks): sizes drawn like ILSVRC2012's (80 % have a 500 px longer side,
  the rest 300-1200 px; aspect ratios 4:3, 3:2, 1:1, 5:4, 16:9, 2:1; a quarter portrait; so the shorter
  side is mostly 250-500 px) and texture + JPEG quality 85-95 that give ~110 KB per image, the real train
  set's mean (147.9 GB / 1,281,167). Images are encoded in `workers` forked processes, each from its own
  seed (seed, split, class, index), so the bytes do not depend on the worker count.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import gzip
import io
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from tasks.common import Result, StageError, atomic_path, file_digest, write_text_atomic
from tasks.ilsvrc import (ARCHIVES, DEVKIT_DIR, DEVKIT_TGZ, GROUND_TRUTH, META_MAT, PNG_AS_JPEG, TRAIN_TAR, VAL_TAR,
                          md5sums_text)


@dataclasses.dataclass
class SynthResult(Result):
    out: str
    classes: int
    train_images: int
    val_images: int
    md5: dict[str, str]
    quirks: dict[str, list[str]]
    seconds: float


def _wnids(rng: np.random.Generator, n: int) -> list[str]:
    ids = {PNG_AS_JPEG[0]} if n >= 1 else set()
    while len(ids) < n:
        ids.add(f"n{rng.integers(1_000_000, 15_000_000):08d}")
    return sorted(ids)


def _image(rng: np.random.Generator, label: int, classes: int) -> Image.Image:
    """One learnable image: the class's hue and stripes under per-image variation."""
    h, w = rng.integers(64, 113, size=2)
    hue = (label * 0.6180339887) % 1.0  # golden-ratio spacing keeps neighbouring classes apart
    angle = np.pi * ((label * 0.381966) % 1.0)
    freq = 0.15 + 0.35 * ((label * 7 % max(classes, 1)) / max(classes, 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    sat = rng.uniform(0.55, 0.9)
    val = rng.uniform(0.6, 1.0) * (0.55 + 0.45 * stripes)
    hsv = np.stack([np.full_like(val, hue + rng.normal(0, 0.015)) % 1.0, np.full_like(val, sat), val], -1)
    rgb = np.asarray(Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB"), np.float32)
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, rng: np.random.Generator, kind: str = "rgb", quality: tuple[int, int] = (75, 96)) -> bytes:
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, "PNG")
    else:
        mode = {"rgb": "RGB", "cmyk": "CMYK", "gray": "L"}[kind]
        img.convert(mode).save(buf, "JPEG", quality=int(rng.integers(*quality)))
    return buf.getvalue()


# --- the "imagenet" profile -----------------------------------------------------------------------

PROFILES = ("small", "imagenet")
_TILE = 1280  # the noise tile: larger than any image side the profile draws
_ASPECTS = np.array([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9, 2.0])
_ASPECT_P = np.array([0.45, 0.30, 0.08, 0.07, 0.05, 0.05])
_NOISE = 15.0                 # texture amplitude (grey levels): with quality 85-95, ~110 KB per image
_QUALITY = (85, 96)
_tiles: dict[int, np.ndarray] = {}


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) drawn like ILSVRC2012's: mostly a 500 px longer side (Flickr's medium size)."""
    long = 500 if rng.random() < 0.8 else int(rng.integers(300, 1201))
    short = int(round(long / rng.choice(_ASPECTS, p=_ASPECT_P)))
    return (short, long) if rng.random() < 0.75 else (long, short)


def _noise_tile(seed: int) -> np.ndarray:
    """One 1280x1280 Gaussian texture per seed and process; each image takes a window of it at its own
    offset (drawing fresh noise per image would cost more than the JPEG encoding)."""
    if seed not in _tiles:
        _tiles[seed] = np.random.default_rng([seed, 0x5EED]).normal(0, _NOISE, (_TILE, _TILE, 3)).astype(np.float32)
    return _tiles[seed]


def _image_imagenet(rng: np.random.Generator, label: int, classes: int, tile: np.ndarray) -> Image.Image:
    """The small profile's class signal (hue, stripe angle and frequency, the frequency relative to the
    shorter side) at an ImageNet image's size, over a texture that gives real-sized JPEGs."""
    h, w = imagenet_size(rng)
    hue = (label * 0.6180339887) % 1.0
    angle = np.pi * ((label * 0.381966) % 1.0)
    freq = (0.15 + 0.35 * ((label * 7 % max(classes, 1)) / max(classes, 1))) * 96 / min(h, w)
    y = np.arange(h, dtype=np.float32) * np.float32(np.sin(angle))
    x = np.arange(w, dtype=np.float32) * np.float32(np.cos(angle))
    stripes = 0.5 + 0.5 * np.sin(freq * np.add.outer(y, x) + np.float32(rng.uniform(0, 2 * np.pi)))
    val = np.float32(rng.uniform(0.6, 1.0)) * (0.55 + 0.45 * stripes)
    color = np.array(colorsys.hsv_to_rgb((hue + rng.normal(0, 0.015)) % 1.0, rng.uniform(0.55, 0.9), 1.0),
                     np.float32) * 255
    oy, ox = int(rng.integers(0, _TILE - h + 1)), int(rng.integers(0, _TILE - w + 1))
    rgb = val[..., None] * color + tile[oy:oy + h, ox:ox + w]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _imagenet_batch(job: tuple[int, int, list[tuple[tuple[int, ...], int, str]]]) -> list[bytes]:
    """Encode a batch of images: (seed, classes, [(stream, label, kind)]); each from rng (seed, *stream)."""
    seed, classes, items = job
    tile = _noise_tile(seed)
    out = []
    for stream, label, kind in items:
        rng = np.random.default_rng([seed, *stream])
        out.append(_encode(_image_imagenet(rng, label, classes, tile), rng, kind, _QUALITY))
    return out


def imagenet_jpegs(n: int, classes: int = 4, seed: int = 0, workers: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(label, JPEG bytes) for n images of the imagenet profile, labels round-robin over `classes`: the
    same images `synthesize(profile="imagenet")` writes, for benchmarks that need only the files."""
    jobs = ((seed, classes, [((2, i), i % classes, "rgb") for i in range(lo, min(n, lo + 64))]) for lo in range(0, n, 64))
    i = 0
    for batch in _ordered(_imagenet_batch, jobs, max(1, workers or len(os.sched_getaffinity(0)))):
        for data in batch:
            yield i % classes, data
            i += 1


def _ordered(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    """fn(job) for each job, in order, in `workers` forked processes with at most 2 x workers jobs in
    flight (results never pile up in memory)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_330_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def _quirk_plan(rng: np.random.Generator, wnids: list[str], per_class: int) -> dict[tuple[str, int], str]:
    """Which train images are odd: (wnid, index) -> "png" | "cmyk" | "gray"."""
    plan: dict[tuple[str, int], str] = {}
    if per_class < 1:
        return plan
    plan[(PNG_AS_JPEG[0], 0)] = "png"
    for kind, count in (("cmyk", 3), ("gray", 3)):
        for _ in range(count):
            key = (wnids[int(rng.integers(len(wnids)))], int(rng.integers(per_class)))
            plan.setdefault(key, kind)
    return plan


def _meta_mat(path: Path, wnids: list[str], ids: dict[str, int], train_counts: dict[str, int]) -> None:
    """Write data/meta.mat with the real devkit's `synsets` struct fields, leaves first by ILSVRC2012_ID."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    leaves = sorted(wnids, key=lambda w: ids[w])
    n = len(leaves)
    # Two non-leaf synsets as in the real file (which has 860 of them after the 1000 leaves).
    parents = [("n00001740", list(range(1, n // 2 + 1))), ("n00002137", list(range(n // 2 + 1, n + 1)))]
    rows = [(ids[w], w, f"synthetic class {w}", "a synthetic leaf synset", 0, np.zeros((0,), np.uint16), 0, train_counts[w]) for w in leaves]
    rows += [(n + 1 + i, w, f"synthetic parent {i}", "a synthetic inner synset", len(ch), np.array(ch, np.uint16), 1, 0)
             for i, (w, ch) in enumerate(parents)]
    arr = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f, v in zip(fields, row):
            arr[i, 0][f] = np.array([[v]], dtype=np.uint16) if f in ("ILSVRC2012_ID", "num_children", "wordnet_height") else (
                np.array([[v]], dtype=np.uint16) if f == "num_train_images" else v)
    scipy.io.savemat(path, {"synsets": arr})
    with open(path, "r+b") as f:  # the 116-byte text header carries a creation date; fix it for reproducible MD5s
        f.write(b"MATLAB 5.0 MAT-file, written by rn50 synth".ljust(116))


def synthesize(out: Path | str, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
               seed: int = 0, progress=None, profile: str = "small", workers: int | None = None) -> SynthResult:
    """Write the synthetic set to OUT. `profile`: "small" (default) or "imagenet" (see the module doc);
    `workers`: processes encoding images for the imagenet profile (default: the usable cores)."""
    if profile not in PROFILES:
        raise StageError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
    if classes < 2 or classes > 1000:
        raise StageError(f"--classes must be between 2 and 1000, got {classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise StageError("--train-per-class and --val-per-class must be at least 1")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = _wnids(rng, classes)
    label = {w: i for i, w in enumerate(wnids)}
    # Real ILSVRC2012_IDs follow WordNet order, not sorted WNIDs: a fixed permutation reproduces that trap.
    ids = {w: int(i) + 1 for w, i in zip(wnids, rng.permutation(classes))}
    # Class sizes vary like the real set (732..1300 of 1300): most full, some short.
    train_counts = {w: int(train_per_class if rng.random() < 0.7 else max(1, round(train_per_class * rng.uniform(0.56, 1.0))))
                    for w in wnids}
    quirks = _quirk_plan(rng, wnids, min(train_counts.values()))
    total = sum(train_counts.values()) + classes * val_per_class
    done = 0
    found: dict[str, list[str]] = {"png_as_jpeg": [], "cmyk": [], "grayscale": []}
    names = {"png": "png_as_jpeg", "cmyk": "cmyk", "gray": "grayscale"}

    def write_image(tar: tarfile.TarFile, name: str, wnid: str, kind: str, where: str) -> None:
        nonlocal done
        _add_bytes(tar, name, _encode(_image(rng, label[wnid], classes), rng, kind))
        if kind != "rgb":
            found[names[kind]].append(where)
        done += 1
        if progress:
            progress(done, total)

    def train_plan(w: str) -> list[tuple[str, str]]:
        plan = []
        for i in range(train_counts[w]):
            kind = quirks.get((w, i), "rgb")
            n = i + 1 + (w == PNG_AS_JPEG[0] and i + 1 >= 2933)  # 2933 is the PNG's number
            plan.append((PNG_AS_JPEG[1] if kind == "png" else f"{w}_{n}.JPEG", kind))
        return plan

    val_labels = [w for w in wnids for _ in range(val_per_class)]

    def val_plan() -> list[tuple[str, str, str]]:
        rng.shuffle(val_labels)  # after the train images: the small profile's rng sequence is unchanged
        return [(f"ILSVRC2012_val_{i:08d}.JPEG", "cmyk" if i == 1 else "gray" if i == 2 else "rgb", w)
                for i, w in enumerate(val_labels, start=1)]

    if profile == "small":
        with atomic_path(out / TRAIN_TAR) as tmp, tarfile.open(tmp, "w") as outer:
            for w in wnids:
                inner_buf = io.BytesIO()
                with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                    for name, kind in train_plan(w):
                        write_image(inner, name, w, kind, f"train/{w}/{name}")
                _add_bytes(outer, f"{w}.tar", inner_buf.getvalue())
        with atomic_path(out / VAL_TAR) as tmp, tarfile.open(tmp, "w") as tar:
            for name, kind, w in val_plan():
                write_image(tar, name, w, kind, f"val/{name}")
    else:
        workers = max(1, workers or len(os.sched_getaffinity(0)))

        def put(tar: tarfile.TarFile, name: str, data: bytes, kind: str, where: str) -> None:
            nonlocal done
            _add_bytes(tar, name, data)
            if kind != "rgb":
                found[names[kind]].append(where)
            done += 1
            if progress:
                progress(done, total)

        plans = {w: train_plan(w) for w in wnids}
        jobs = ((seed, classes, [((0, label[w], i), label[w], kind) for i, (_, kind) in enumerate(plans[w])])
                for w in wnids)
        with atomic_path(out / TRAIN_TAR) as tmp, tarfile.open(tmp, "w") as outer:
            for w, images in zip(wnids, _ordered(_imagenet_batch, jobs, workers)):
                inner_buf = io.BytesIO()
                with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                    for (name, kind), data in zip(plans[w], images):
                        put(inner, name, data, kind, f"train/{w}/{name}")
                _add_bytes(outer, f"{w}.tar", inner_buf.getvalue())
        vplan = val_plan()
        chunks = [vplan[i:i + 128] for i in range(0, len(vplan), 128)]
        jobs = ((seed, classes, [((1, int(name[15:23])), label[w], kind) for name, kind, w in chunk]) for chunk in chunks)
        with atomic_path(out / VAL_TAR) as tmp, tarfile.open(tmp, "w") as tar:
            for chunk, images in zip(chunks, _ordered(_imagenet_batch, jobs, workers)):
                for (name, kind, w), data in zip(chunk, images):
                    put(tar, name, data, kind, f"val/{name}")

    with atomic_path(out / DEVKIT_TGZ) as tmp:
        meta = tmp.with_suffix(".mat")
        try:
            _meta_mat(meta, wnids, ids, train_counts)
            # mtime=0 in the gzip header: the same seed gives the same bytes, hence the same MD5.
            with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as gz, \
                    tarfile.open(fileobj=gz, mode="w") as tar:
                _add_bytes(tar, META_MAT, meta.read_bytes())
                truth = val_labels[:-1] + [wnids[(wnids.index(val_labels[-1]) + 1) % classes]]
                _add_bytes(tar, GROUND_TRUTH, "".join(f"{ids[w]}\n" for w in truth).encode())
                _add_bytes(tar, f"{DEVKIT_DIR}/readme.txt", b"Synthetic ILSVRC2012 devkit written by rn50 synth.\n")
        finally:
            meta.unlink(missing_ok=True)

    md5 = {n: file_digest(out / n) for n in ARCHIVES}
    write_text_atomic(out / "MD5SUMS", md5sums_text(md5))
    return SynthResult(str(out), classes, sum(train_counts.values()), len(val_labels), md5, found,
                       round(time.perf_counter() - t0, 2))


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic ILSVRC2012 (real archive layout and quirks, learnable images)",
                       description="Write a synthetic ILSVRC2012 into OUT: the three archives image-net.org hands out "
                                   "(train tar of class tars, flat val tar, devkit with meta.mat and ground truth) and an "
                                   "MD5SUMS, with the real set's quirks (a PNG saved as .JPEG, CMYK and grayscale JPEGs) "
                                   "and images a network can learn. Use it as SOURCE for rn50 fetch or rn50 run.")
    p.add_argument("out", type=Path, help="directory to write the archives and MD5SUMS into")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--train-per-class", type=int, default=100, help="train images per class (default 100)")
    p.add_argument("--val-per-class", type=int, default=20, help="val images per class (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed: every image is drawn from it (default 0)")
    p.add_argument("--profile", choices=PROFILES, default="small",
                   help="small: 64-112 px, ~4 KB images (default); imagenet: ILSVRC2012's sizes, ~110 KB images")
    p.add_argument("--workers", type=int, default=None, help="encoding processes for --profile imagenet")
    p.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with tqdm(desc="synth", unit="img", disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        r = synthesize(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed, progress,
                       args.profile, args.workers)
    print(f"wrote {r.train_images} train + {r.val_images} val images in {r.classes} classes to {r.out} "
          f"({r.seconds:.1f} s); checksums in {Path(r.out) / 'MD5SUMS'}")
    return 0
