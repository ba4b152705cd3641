"""DALI pipelines on real im2rec output: the quirky records decode, val shards cover every image once."""
import mxnet as mx
import numpy as np
import pytest

from rn50 import data as rdata
from rn50.config import load_config
from rn50.tinydata import make_recordio, pack


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec")
    # 3 classes x 6 train, x 5 val; class 0 holds a PNG saved as .JPEG and a CMYK JPEG, class 1 a grayscale one.
    return make_recordio(out, classes=3, train_per_class=6, val_per_class=5, seed=3)


def test_one_val_record_is_under_two_labels(rec):
    """A copy of one validation image under another label: top-1 cannot reach 1.0, which the MLPerf checker
    refuses as implausible."""
    val = mx.recordio.MXIndexedRecordIO(str(rec / "val.idx"), str(rec / "val.rec"), "r")
    labels: dict[bytes, set] = {}
    for key in val.keys:
        header, payload = mx.recordio.unpack(val.read_idx(key))
        labels.setdefault(payload, set()).add(int(header.label))
    val.close()
    assert len(labels) == 3 * 5 - 1 and [sorted(v) for v in labels.values() if len(v) > 1] == [[0, 1]]


@pytest.fixture(scope="module")
def cfg():
    return load_config("cpu-demo", ["dali_threads=1"])


def test_quirky_records_are_in_the_set(rec):
    raw = [open(rec / "_images" / "train" / "cls000" / f"cls000_{i}.JPEG", "rb").read(4) for i in (0, 1)]
    assert raw[0].startswith(b"\x89PNG")       # PNG bytes under a .JPEG name
    assert raw[1].startswith(b"\xff\xd8")       # the CMYK one is a real JPEG
    from PIL import Image
    assert Image.open(rec / "_images" / "train" / "cls000" / "cls000_1.JPEG").mode == "CMYK"


def test_every_record_decodes_to_rgb(rec, cfg):
    for split, crop in (("train", cfg["train_crop"]), ("val", cfg["val_crop"])):
        n = rdata.count_records(rec / f"{split}.idx")
        # One batch = the whole set: every record (PNG, CMYK, grayscale included) exactly once.
        pipe = rdata.build_pipeline(rec, split, cfg, 0, 1, None, seed=1, batch_size=n)
        x, y = rdata.Loader(pipe, mx.cpu()).next()
        assert x.shape == (n, 3, crop, crop)
        assert np.isfinite(x.asnumpy()).all()
        assert sorted(y.asnumpy().tolist()) == sorted(int(float(l.split("\t")[1])) for l in open(rec / f"{split}.lst"))


def test_val_shards_cover_all_images_exactly_once(rec, cfg):
    n = rdata.count_records(rec / "val.idx")
    batch = 4
    labels = []
    for shard in range(2):
        pipe = rdata.build_pipeline(rec, "val", cfg, shard, 2, None, seed=1, batch_size=batch)
        loader = rdata.Loader(pipe, mx.cpu())
        b, e = rdata.shard_bounds(n, shard, 2)
        got = [y.asnumpy() for _, y in loader.batches(rdata.val_batches_per_shard(n, 2, batch))]
        flat = np.concatenate(got)[: e - b]
        labels.extend(flat.tolist())
        # A second evaluation reads the same shard again from its start.
        again = np.concatenate([y.asnumpy() for _, y in loader.batches(rdata.val_batches_per_shard(n, 2, batch))])[: e - b]
        assert again.tolist() == flat.tolist()
    lst = sorted(int(float(line.split("\t")[1])) for line in open(rec / "val.lst"))
    assert sorted(labels) == lst and len(labels) == n


GRADIENT_SIZES = {0: (240, 96), 1: (96, 240)}  # label: (width, height): one wide image, one tall one


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """RecordIO of two JPEGs whose red channel rises 0 -> 255 left to right and green 0 -> 255 top to
    bottom: the mean colour of a crop says where in the image it was taken."""
    from PIL import Image

    root = tmp_path_factory.mktemp("gradients")
    for split in ("train", "val"):
        for label, (w, h) in GRADIENT_SIZES.items():
            xx, yy = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
            d = root / "img" / split / f"cls{label:03d}"
            d.mkdir(parents=True)
            Image.fromarray(np.stack([xx, yy, np.full_like(xx, 128)], -1).round().astype(np.uint8)).save(
                d / "g.JPEG", quality=95)
    return pack(root / "img", root / "rec")


def test_val_images_are_center_crops(gradients, cfg):
    """Shorter side resized to val_resize, then the central val_crop square: a crop from a corner or an edge
    (DALI's crop_pos_x/crop_pos_y != 0.5), or one cut before resizing, fails here."""
    crop, short = cfg["val_crop"], cfg["val_resize"]
    pipe = rdata.build_pipeline(gradients, "val", cfg, 0, 1, None, seed=1, batch_size=2)
    x, y = rdata.Loader(pipe, mx.cpu()).next()
    assert x.shape == (2, 3, crop, crop)
    pixels = x.asnumpy() * np.array(rdata.STD)[None, :, None, None] + np.array(rdata.MEAN)[None, :, None, None]
    for img, label in zip(pixels, y.asnumpy().astype(int).tolist()):
        w, h = GRADIENT_SIZES[label]
        red, green = img[0], img[1]
        # The centre of the crop is the centre of the image: both gradients read mid-range there. An edge
        # crop would be off by >= 15 on the short axis and by >= 80 on the long one.
        assert abs(red.mean() - 127.5) < 5 and abs(green.mean() - 127.5) < 5, (label, red.mean(), green.mean())
        # The crop spans crop/resized-length of the gradient along each axis (resized before cropping).
        scale = short / min(w, h)
        for channel, length, axis in ((red, w, 1), (green, h, 0)):
            span = np.median(channel.max(axis=axis) - channel.min(axis=axis))
            expected = 255 * (crop - 1) / (round(length * scale) - 1)
            assert abs(span - expected) < 6, (label, axis, span, expected)


def test_missing_recordio_is_a_clear_error(tmp_path, cfg):
    with pytest.raises(FileNotFoundError, match="train.rec"):
        rdata.build_pipeline(tmp_path, "train", cfg, 0, 1, None, seed=1)
