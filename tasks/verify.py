"""Verify stage: extract the archives safely, index every image, and hold the index to the devkit.

raw/ -> extracted/{train,val}/<wnid>/*.JPEG, manifest.parquet, reports/verify.{md,json}.

Every expectation is derived from the three archives, because they are all a real user has: the class
set and per-class train counts come from the devkit's meta.mat (num_train_images), the val count from
the ground-truth file. Val images are sorted into class folders through ILSVRC2012_ID -> WNID from
meta.mat; the IDs are NOT sorted-WNID class indices. Quirks (PNG saved as .JPEG, CMYK, grayscale) are
reported, not failed on: training decoders must cope with them as they do for the real dataset.

Extraction goes to extracted.partial/ and is renamed to extracted/ only after the manifest passed,
so a kill or a failure never leaves a tree that a later run would take as verified.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import posixpath
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from tasks.common import (Result, StageError, Workdir, atomic_path, digest_of, read_stamp, stamp_valid,
                          write_json_atomic, write_stamp, write_text_atomic)
from tasks.ilsvrc import (ARCHIVES, DEVKIT_GROUND_TRUTH, DEVKIT_META, DEVKIT_TGZ, MANIFEST_COLUMNS, TRAIN_TAR, VAL_NAME,
                          VAL_TAR, manifest_digest, read_fetch_record)

Progress = Callable[[str, int, Optional[int]], None]


@dataclasses.dataclass
class VerifyResult(Result):
    workdir: str
    manifest: str
    manifest_digest: str
    archives_digest: str
    classes: int
    train_images: int
    val_images: int
    bytes: int
    quirks: dict[str, list[str]]
    expectations: list[dict[str, Any]]
    report: str
    reused: bool
    seconds: float


# --- safe extraction ------------------------------------------------------------------------------


def _check_member(archive: str, m: tarfile.TarInfo) -> None:
    """Refuse absolute paths, `..`, links leaving the archive's tree, and device/fifo members."""
    name = m.name
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
        raise StageError(f"{archive}: refusing member {name!r}: its path leaves the extraction directory")
    if m.issym() or m.islnk():
        target = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(norm), m.linkname)
        t = posixpath.normpath(target)
        if m.linkname.startswith("/") or t == ".." or t.startswith("../"):
            raise StageError(f"{archive}: refusing member {name!r}: link to {m.linkname!r} points outside")
        raise StageError(f"{archive}: refusing member {name!r}: links are not expected in ILSVRC2012 archives")
    if not (m.isfile() or m.isdir()):
        raise StageError(f"{archive}: refusing member {name!r}: not a regular file")


def _members(archive: Path, fileobj=None):
    """Yield (TarInfo, bytes) for regular files of a tar read as a stream, each member checked first."""
    try:
        with tarfile.open(archive if fileobj is None else None, mode="r|*", fileobj=fileobj) as tar:
            for m in tar:
                _check_member(archive.name, m)
                if m.isfile():
                    yield m, tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StageError(f"{archive.name}: damaged archive ({e})") from None


def _store(root: Path, rel: str, data: bytes, rows: list[dict], split: str, wnid: str, workdir: Path) -> None:
    path = root / split / wnid / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "xb") as f:  # "x": a duplicate name in an archive is an error, never a silent overwrite
            f.write(data)
    except FileExistsError:
        raise StageError(f"the {split} archive holds {wnid}/{rel} twice") from None
    rows.append({"split": split, "wnid": wnid, "path": str(path.relative_to(workdir)).replace("extracted.partial", "extracted", 1),
                 "bytes": len(data), "md5": hashlib.md5(data).hexdigest(), "abs": str(path)})


# --- devkit ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Devkit:
    wnids: list[str]                    # leaf synsets = the classes, sorted: label = index here
    num_train_images: dict[str, int]
    val_wnids: list[str]                # per val image (1-based index - 1): its class


def read_devkit(path: Path) -> Devkit:
    import scipy.io

    meta = gt = None
    for m, data in _members(path):
        if m.name.endswith(DEVKIT_META):
            meta = data
        elif m.name.endswith(DEVKIT_GROUND_TRUTH):
            gt = data
    if meta is None:
        raise StageError(f"{path.name}: devkit has no data/meta.mat")
    if gt is None:
        raise StageError(f"{path.name}: devkit has no data/ILSVRC2012_validation_ground_truth.txt")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        counts = {str(s["WNID"]): int(s["num_train_images"]) for s in leaves}
    except Exception as e:  # a malformed .mat can fail in many ways; all mean the same to the user
        raise StageError(f"{path.name}: unreadable data/meta.mat ({type(e).__name__}: {e})") from None
    try:
        val = [by_id[int(line)] for line in gt.decode().split()]
    except (ValueError, KeyError) as e:
        raise StageError(f"{path.name}: ground truth names an ILSVRC2012_ID that meta.mat lacks ({e})") from None
    return Devkit(sorted(counts), counts, val)


# --- image facts (run in worker processes) --------------------------------------------------------


def _inspect(paths: list[str]) -> list[tuple[int, int, str, str, bool]]:
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h, mode, fmt = im.width, im.height, im.mode, im.format or "?"
                # draft() decodes JPEGs at 1/8 scale: every byte of entropy data is still decoded.
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
            out.append((w, h, mode, fmt, True))
        except Exception:
            out.append((0, 0, "", "", False))
    return out


def _inspect_all(paths: list[str], workers: int) -> list[tuple]:
    chunk = 512
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        return [r for c in chunks for r in _inspect(c)]
    with ProcessPoolExecutor(workers) as ex:
        return [r for rs in ex.map(_inspect, chunks) for r in rs]


# --- expectations ---------------------------------------------------------------------------------


def _validate(df, devkit: Devkit) -> list[dict[str, Any]]:
    """Great Expectations suites over the manifest and its per-class counts; one dict per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("rn50")
    E = gx.expectations
    n_train = sum(devkit.num_train_images.values())
    lo, hi = min(devkit.num_train_images.values()), max(devkit.num_train_images.values())
    val_expected = pd.Series(devkit.val_wnids).value_counts()

    def per_class(split: str, expected) -> "pd.DataFrame":
        got = df[df.split == split].groupby("wnid").size()
        frame = pd.DataFrame({"wnid": devkit.wnids})
        frame["count"] = frame.wnid.map(got).fillna(0).astype(int)
        frame["expected"] = frame.wnid.map(expected).fillna(0).astype(int)
        return frame

    suites = {
        "images": (df, [
            E.ExpectTableRowCountToEqual(value=n_train + len(devkit.val_wnids)),
            E.ExpectColumnValuesToBeUnique(column="path"),
            E.ExpectColumnValuesToNotBeNull(column="md5"),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"]),
            E.ExpectColumnValuesToBeInSet(column="wnid", value_set=devkit.wnids),
            E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=len(devkit.wnids) - 1),
            E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1),
        ]),
        "train_images": (df[df.split == "train"], [E.ExpectTableRowCountToEqual(value=n_train)]),
        "val_images": (df[df.split == "val"], [E.ExpectTableRowCountToEqual(value=len(devkit.val_wnids))]),
        "train_per_class": (per_class("train", devkit.num_train_images), [
            E.ExpectTableRowCountToEqual(value=len(devkit.wnids)),
            E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="expected"),
            E.ExpectColumnValuesToBeBetween(column="count", min_value=lo, max_value=hi),
        ]),
        "val_per_class": (per_class("val", val_expected), [
            E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="expected"),
        ]),
    }
    out = []
    for name, (frame, expectations) in suites.items():
        asset = source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name)
        for e in expectations:
            suite.add_expectation(e)
        for r in batch.validate(suite).results:
            cfg = r.expectation_config
            kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "value_set") or len(str(v)) < 200}
            res = r.result or {}
            out.append({"suite": name, "expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success),
                        "observed": res.get("observed_value", res.get("unexpected_count")),
                        "examples": [str(x) for x in (res.get("partial_unexpected_list") or [])[:5]]})
    return out


def _report(wd: Workdir, r: dict[str, Any]) -> Path:
    lines = ["# Data verification report", "",
             f"- classes: {r['classes']}, train images: {r['train_images']:,}, val images: {r['val_images']:,}",
             f"- bytes: {r['bytes']:,}, manifest digest: `{r['manifest_digest'][:16]}`", "",
             "| suite | expectation | observed | result |", "|---|---|---|---|"]
    for e in r["expectations"]:
        lines.append(f"| {e['suite']} | {e['expectation']} | {e['observed']} | {'pass' if e['success'] else '**FAIL** ' + ', '.join(e['examples'])} |")
    lines += ["", "## Quirks (reported, not failed on)", ""]
    for kind, paths in r["quirks"].items():
        lines.append(f"- {kind}: {len(paths)}" + (": " + ", ".join(f"`{p}`" for p in paths[:20]) if paths else ""))
    write_json_atomic(wd.reports / "verify.json", r)
    return write_text_atomic(wd.reports / "verify.md", "\n".join(lines) + "\n")


def archives_digest(wd: Workdir) -> str:
    """Digest of the three verified archives, from the fetch stage's records (no re-hash)."""
    md5 = {}
    for name in ARCHIVES:
        record = read_fetch_record(wd.raw, name)
        if not record or "md5" not in record:
            raise StageError(f"{wd.raw / name} has not been fetched and verified; run `rn50 fetch` first")
        md5[name] = record["md5"]
    return digest_of(md5)


def verify(workdir: Path | str, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    t0 = time.perf_counter()
    wd = Workdir(workdir)
    key = archives_digest(wd)
    if stamp_valid(wd, "verify", key):
        stamp = read_stamp(wd, "verify")
        return VerifyResult(**{**stamp["result"], "reused": True, "seconds": round(time.perf_counter() - t0, 2)})

    import pandas as pd

    devkit = read_devkit(wd.raw / DEVKIT_TGZ)
    partial = wd.root / "extracted.partial"
    shutil.rmtree(partial, ignore_errors=True)
    rows: list[dict] = []
    try:
        for inner, data in _members(wd.raw / TRAIN_TAR):
            wnid = inner.name.rsplit("/", 1)[-1].removesuffix(".tar")
            if not inner.name.endswith(".tar"):
                raise StageError(f"{TRAIN_TAR}: unexpected member {inner.name!r} (expected <wnid>.tar)")
            for m, img in _members(Path(inner.name), io.BytesIO(data)):
                _store(partial, posixpath.basename(m.name), img, rows, "train", wnid, wd.root)
            if progress:
                progress("train", len(rows), sum(devkit.num_train_images.values()))
        n_train = len(rows)
        for m, img in _members(wd.raw / VAL_TAR):
            match = VAL_NAME.search(m.name)
            if not match or "/" in m.name:
                raise StageError(f"{VAL_TAR}: unexpected member {m.name!r} (expected ILSVRC2012_val_NNNNNNNN.JPEG)")
            index = int(match.group(1))
            if not 1 <= index <= len(devkit.val_wnids):
                raise StageError(f"{VAL_TAR}: {m.name} has no line in the devkit's ground truth "
                                 f"({len(devkit.val_wnids)} lines)")
            _store(partial, m.name, img, rows, "val", devkit.val_wnids[index - 1], wd.root)
            if progress and (len(rows) - n_train) % 1000 == 0:
                progress("val", len(rows) - n_train, len(devkit.val_wnids))

        df = pd.DataFrame(rows)
        if df.empty:
            raise StageError("the archives hold no images")
        facts = _inspect_all(df["abs"].tolist(), workers or os.cpu_count() or 1)
        df[["width", "height", "mode", "format", "decodable"]] = pd.DataFrame(facts, index=df.index)
        label = {w: i for i, w in enumerate(devkit.wnids)}
        df["label"] = df.wnid.map(label).fillna(-1).astype(int)
        df = df.drop(columns="abs")[MANIFEST_COLUMNS]
        expectations = _validate(df, devkit)
        quirks = {
            "png_as_jpeg": df.path[(df.format == "PNG")].tolist(),
            "cmyk": df.path[df["mode"] == "CMYK"].tolist(),
            "grayscale": df.path[df["mode"] == "L"].tolist(),
            "undecodable": df.path[~df.decodable].tolist(),
        }
        result = {
            "workdir": str(wd.root), "manifest": str(wd.manifest), "manifest_digest": manifest_digest(df),
            "archives_digest": key, "classes": len(devkit.wnids), "train_images": int((df.split == "train").sum()),
            "val_images": int((df.split == "val").sum()), "bytes": int(df.bytes.sum()), "quirks": quirks,
            "expectations": expectations, "report": str(wd.reports / "verify.md"), "reused": False,
        }
        _report(wd, {**result, "seconds": round(time.perf_counter() - t0, 2)})
        failed = [e for e in expectations if not e["success"]]
        if failed:
            raise StageError(f"{len(failed)} of {len(expectations)} data expectations failed: "
                             + "; ".join(f"{e['suite']}.{e['expectation']} (observed {e['observed']})" for e in failed[:4])
                             + f" — see {wd.reports / 'verify.md'}")
        with atomic_path(wd.manifest) as tmp:
            df.to_parquet(tmp, index=False)
        shutil.rmtree(wd.extracted, ignore_errors=True)
        os.replace(partial, wd.extracted)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_stamp(wd, "verify", key, result, [wd.manifest, wd.extracted])
    return VerifyResult(**result)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="extract the archives safely, build manifest.parquet and validate it")
    p.add_argument("workdir", type=Path)
    p.add_argument("--workers", type=int, default=None, help="processes for decoding checks (default: all cores)")
    p.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(split: str, done: int, total: int | None) -> None:
        bar = bars.get(split) or bars.setdefault(split, tqdm(desc=f"extract {split}", total=total, unit="img", disable=None))
        bar.update(done - bar.n)

    try:
        r = verify(args.workdir, args.workers, progress)
    finally:
        for bar in bars.values():
            bar.close()
    passed = sum(e["success"] for e in r.expectations)
    print(f"{r.classes} classes, {r.train_images:,} train + {r.val_images:,} val images: "
          f"{passed}/{len(r.expectations)} expectations passed{' (already verified)' if r.reused else ''}")
    print("quirks: " + ", ".join(f"{k} {len(v)}" for k, v in r.quirks.items()))
    print(f"manifest: {r.manifest}\nreport:   {r.report}")
    return 0
