"""DALI (CPU) vs a PIL baseline: the training input pipeline, in images per CPU-second.

Both do the same work per image from the same RecordIO: read the record, decode the JPEG, random-
resized-crop (area 5-100 %, aspect 3/4-4/3), resize to CROP, random flip, normalize, emit float32
CHW. CPU time is the process's user+system time (all threads), so thread count does not flatter
either side. Run from the repo root:

    .venv/bin/python bench/train_dataloader.py [--data RECORDIO_DIR] [--crop 224] [--images 600]

Without --data it packs 256 `rn50 synth --profile imagenet` JPEGs (ILSVRC2012's image sizes, ~110 KB
each) with im2rec in a temp dir: the images bench/data_path.py measures the data stages on.
"""
from __future__ import annotations

import argparse
import io
import math
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_imagenet_sized(root: Path, n: int) -> Path:
    """RecordIO of n `rn50 synth --profile imagenet` JPEGs (ILSVRC2012's sizes, ~110 KB each), packed
    with im2rec like the pipeline's own."""
    from rn50.tinydata import pack
    from tasks.synth import imagenet_jpegs

    for split, count in (("train", n), ("val", 4)):
        for i, (label, data) in enumerate(imagenet_jpegs(count, classes=4, seed=0 if split == "train" else 1)):
            d = root / "img" / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}.JPEG").write_bytes(data)
    return pack(root / "img", root / "rec")


def rrc_params(w: int, h: int, rnd: random.Random, area=(0.05, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: the same distribution DALI samples from."""
    for _ in range(10):
        target = w * h * rnd.uniform(*area)
        ar = math.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rnd.randint(0, w - cw), rnd.randint(0, h - ch), cw, ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, s, s


def run_pil(data: Path, crop: int, n: int, draft: bool = False) -> tuple[int, float, float]:
    import mxnet as mx
    from PIL import Image

    rec = mx.recordio.MXIndexedRecordIO(str(data / "train.idx"), str(data / "train.rec"), "r")
    keys = list(rec.keys)
    rnd = random.Random(0)
    c0, t0 = cpu_seconds(), time.perf_counter()
    for i in range(n):
        _, payload = mx.recordio.unpack(rec.read_idx(keys[i % len(keys)]))
        img = Image.open(io.BytesIO(payload))
        if draft:
            # JPEG DCT-domain downscale to >= 2x the crop: faster, but a lower-resolution source than
            # torchvision's loader (and DALI) crop from, so it is reported separately.
            img.draft("RGB", (2 * crop, 2 * crop))
        img = img.convert("RGB")
        x, y, w, h = rrc_params(img.size[0], img.size[1], rnd)
        img = img.resize((crop, crop), Image.BILINEAR, box=(x, y, x + w, y + h))
        if rnd.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out = ((np.asarray(img, np.float32) - MEAN) / STD).transpose(2, 0, 1)
        assert out.shape == (3, crop, crop)
    return n, cpu_seconds() - c0, time.perf_counter() - t0


def run_dali(data: Path, crop: int, n: int, threads: int, batch: int) -> tuple[int, float, float]:
    import mxnet as mx

    from rn50 import data as rdata
    from rn50.config import load_config

    cfg = load_config("cpu-demo", [f"train_crop={crop}", f"dali_threads={threads}", "dali_prefetch=2",
                                    "min_random_area=0.05"])
    pipe = rdata.build_pipeline(data, "train", cfg, 0, 1, None, seed=0, batch_size=batch)
    loader = rdata.Loader(pipe, mx.cpu())
    loader.next()  # warm-up: pipeline threads and buffers
    steps = max(1, n // batch)
    c0, t0 = cpu_seconds(), time.perf_counter()
    for x, _ in loader.batches(steps):
        assert x.shape == (batch, 3, crop, crop)
    x.wait_to_read()
    return steps * batch, cpu_seconds() - c0, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or make_imagenet_sized(Path(tmp), 256)
        # DALI runs in a child so its threads' CPU time is not mixed with PIL's.
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as pool:
            d = pool.apply(run_dali, (data, a.crop, a.images, a.threads, a.batch))
        with mp.get_context("spawn").Pool(1) as pool:
            p = pool.apply(run_pil, (data, a.crop, a.images))
        with mp.get_context("spawn").Pool(1) as pool:
            pd = pool.apply(run_pil, (data, a.crop, a.images, True))
    for name, (n, cpu, wall) in (("PIL", p), ("PIL+draft", pd), (f"DALI cpu x{a.threads}", d)):
        print(f"{name:12s} {n:5d} img  {cpu:7.2f} CPU-s  {wall:6.2f} wall-s  {n / cpu:8.1f} img/CPU-s  {n / wall:8.1f} img/s")
    rate = lambda r: r[0] / r[1]  # noqa: E731
    print(f"DALI/PIL per CPU-second: {rate(d) / rate(p):.2f}x (vs PIL+draft: {rate(d) / rate(pd):.2f}x)  "
          f"(data: {a.data or 'rn50 synth --profile imagenet JPEGs'}, crop {a.crop})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
