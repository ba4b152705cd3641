"""DALI input pipelines over im2rec RecordIO (train.rec/idx, val.rec/idx), sharded by Horovod rank.

train: random-resized-crop (decoder-fused) -> random horizontal flip -> normalize
val:   decode -> resize shorter side to `val_resize` -> center crop `val_crop` -> normalize
Without a GPU the pipelines are pure CPU (`device_id=None`); with one, decoding is "mixed" (nvJPEG,
host parsing + device decode) and the rest runs on the GPU. DALI's decoders sniff the format, so the
PNG stored as .JPEG and CMYK/grayscale JPEGs all come out as 3-channel RGB.

The pipelines run asynchronously with a prefetch queue, so decoding overlaps the training step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
READER = "Reader"


def recordio_paths(data_dir: Path, split: str) -> Tuple[Path, Path]:
    rec, idx = Path(data_dir) / f"{split}.rec", Path(data_dir) / f"{split}.idx"
    for p in (rec, idx):
        if not p.is_file():
            raise FileNotFoundError(f"missing {p} (expected im2rec output {split}.rec/.idx in {data_dir})")
    return rec, idx


def count_records(idx_path: Path) -> int:
    with open(idx_path) as f:
        return sum(1 for line in f if line.strip())


def max_label(data_dir: Path) -> int:
    """Largest class label, from the .lst files im2rec wrote beside the .rec (idx<TAB>label<TAB>path)."""
    best = -1
    for split in ("train", "val"):
        lst = Path(data_dir) / f"{split}.lst"
        if lst.is_file():
            with open(lst) as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) >= 3:
                        best = max(best, int(float(parts[1])))
    return best


def shard_bounds(n: int, shard_id: int, num_shards: int) -> Tuple[int, int]:
    """The [begin, end) records of a shard, as DALI's readers split them."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def _decode_device(cfg: Dict, gpu: Optional[int]) -> str:
    if cfg["dali_decode"] == "auto":
        return "mixed" if gpu is not None else "cpu"
    if cfg["dali_decode"] == "mixed" and gpu is None:
        raise ValueError("dali_decode=mixed needs a GPU")
    return cfg["dali_decode"]


def build_pipeline(data_dir: Path, split: str, cfg: Dict, shard_id: int, num_shards: int,
                   gpu: Optional[int], seed: int, batch_size: Optional[int] = None):
    from nvidia.dali import fn, pipeline_def, types

    rec, idx = recordio_paths(data_dir, split)
    train = split == "train"
    decode = _decode_device(cfg, gpu)
    dev = "gpu" if decode == "mixed" else "cpu"
    layout = "HWC" if cfg["layout"] == "NHWC" else "CHW"
    dtype = types.FLOAT16 if cfg["dtype"] == "float16" else types.FLOAT
    batch = batch_size or cfg["batch_size"]

    @pipeline_def(batch_size=batch, num_threads=cfg["dali_threads"], device_id=gpu, seed=seed,
                  prefetch_queue_depth=cfg["dali_prefetch"])
    def pipe():
        jpegs, labels = fn.readers.mxnet(
            path=[str(rec)], index_path=[str(idx)], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=train, initial_fill=cfg["dali_initial_fill"],
            # val: every rank reads exactly its own shard, padded to whole batches (padding is discarded).
            pad_last_batch=not train, stick_to_shard=not train, name=READER)
        extra = {"hw_decoder_load": cfg["dali_hw_decoder_load"]} if decode == "mixed" else {}
        # Bilinear as in NVIDIA's MLPerf pipeline; antialiasing only matters for strong downscales
        # (rare for random-resized crops) and costs ~15 % of the CPU pipeline's time.
        resize = {"interp_type": types.INTERP_LINEAR, "antialias": cfg["dali_resize_antialias"]}
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decode, output_type=types.RGB,
                random_area=[cfg["min_random_area"], cfg["max_random_area"]],
                random_aspect_ratio=[cfg["min_random_aspect_ratio"], cfg["max_random_aspect_ratio"]],
                num_attempts=100, **extra)
            images = fn.resize(images, device=dev, resize_x=cfg["train_crop"], resize_y=cfg["train_crop"], **resize)
            mirror = fn.random.coin_flip(probability=0.5)
            crop = cfg["train_crop"]
        else:
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB, **extra)
            images = fn.resize(images, device=dev, resize_shorter=cfg["val_resize"], **resize)
            mirror = 0
            crop = cfg["val_crop"]
        images = fn.crop_mirror_normalize(images, device=dev, dtype=dtype, output_layout=layout,
                                          crop=(crop, crop), mean=MEAN, std=STD, mirror=mirror)
        labels = fn.cast(labels, dtype=types.INT32)
        if dev == "gpu":
            labels = labels.gpu()
        return images, labels

    p = pipe()
    p.build()
    return p


class Loader:
    """Endless stream of (images, labels) mx.nd batches from a built pipeline.

    The caller decides how many batches make an epoch (every rank must take the same number of
    optimizer steps, or the allreduce would hang); the reader just wraps around its data.
    """

    def __init__(self, pipe, ctx):
        self.pipe, self.ctx = pipe, ctx
        self.num_records = pipe.reader_meta(READER)["epoch_size"]

    def next(self):
        import mxnet as mx

        images, labels = self.pipe.run()
        return _to_mx(images, self.ctx, mx), _to_mx(labels, self.ctx, mx).reshape((-1,))

    def batches(self, n: int) -> Iterator:
        for _ in range(n):
            yield self.next()


def _to_mx(tl, ctx, mx):
    tensor = tl.as_tensor()
    if ctx.device_type == "gpu":
        # Device-to-device copy into an MXNet array; no trip through host memory.
        from nvidia.dali import types
        from nvidia.dali.plugin.mxnet import feed_ndarray

        out = mx.nd.empty(tuple(tensor.shape()), ctx=ctx, dtype=types.to_numpy_type(tensor.dtype))
        feed_ndarray(tensor, out)
        return out
    arr = np.asarray(tensor)
    return mx.nd.array(arr, ctx=ctx, dtype=arr.dtype)


def val_batches_per_shard(n: int, num_shards: int, batch: int) -> int:
    """With pad_last_batch every shard is padded to the same number of batches (DALI's rule)."""
    return math.ceil(math.ceil(n / num_shards) / batch)
