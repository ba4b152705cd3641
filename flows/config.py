"""Pipeline configs: named YAML files in configs/pipeline/ (or a path), checked against a schema, with
{source}/{workdir} filled in.

The schema (`PipelineConfig`, pydantic) rejects an unknown key, a value of the wrong type and a missing
required value with a one-line `StageError` naming the file, the key and what was expected, e.g.

    pipeline config configs/pipeline/demo.yaml: train.thredas: unknown key (expected one of: config, hosts, ...)

`rn50 run` checks the config this way before it starts a Prefect server or a flow run (`check_pipeline`),
and the flow checks it again for a deployment run (`load_pipeline`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks import paths
from tasks.common import StageError
from tasks.container import check_build_args

PROJECT = paths.REPO


class _Section(BaseModel):
    # strict: `full_check: "no"` or `runs: "5"` are mistakes, not values to coerce
    model_config = ConfigDict(extra="forbid", strict=True)


class FetchConfig(_Section):
    md5_file: Optional[str] = Field(None, description="MD5SUMS file of the archives; null = the official ILSVRC2012 MD5s")


class PackConfig(_Section):
    threads: Optional[int] = Field(None, ge=1, description="im2rec/pack threads; null = all cores")
    full_check: bool = Field(False, description="compare every record with its source file, not a 1 % sample")


class ContainerConfig(_Section):
    runtime: Literal["local", "docker"] = Field("local", description="local: train on the hosts; docker: in the image")
    from_image: str = "nvcr.io/nvidia/mxnet:23.09-py3"
    registry: Optional[str] = None
    push: bool = False
    build_args: Dict[str, str] = Field(default_factory=dict,
                                       description="extra Dockerfile ARGs (RUNTIME_ENV, APT_PACKAGES, PIP_INSTALL)")
    network: Optional[str] = Field(None, description="network of the build's RUN steps (e.g. host, none); null = the engine's default")

    @field_validator("build_args")
    @classmethod
    def _no_provenance_override(cls, v: Dict[str, str]) -> Dict[str, str]:
        try:
            check_build_args(v)
        except StageError as e:
            raise ValueError(str(e)) from None
        return v


class TrainConfig(_Section):
    config: str = Field(description="training config name (configs/training/) or path")
    hosts: Optional[str] = Field(None, description="host inventory YAML; null = this machine")
    runs: int = Field(1, ge=1)
    timeout_minutes: float = Field(30, gt=0)
    cluster_limit: str = Field("rn50-cluster", min_length=1,
                               description="Prefect global concurrency limit held while training (one per cluster)")


class ComplianceConfig(_Section):
    ruleset: str = "4.0.0"
    dataset: Literal["auto", "imagenet", "synthetic"] = "auto"


class ArchiveConfig(_Section):
    uri: str = Field(description="s3://bucket/prefix or file:///path")
    include_checkpoints: bool = False


class NightlyConfig(_Section):
    runs: int = Field(1, ge=1)
    seed: int = 1
    tolerance_epochs: float = Field(2, ge=0)
    tolerance_accuracy: float = Field(0.02, ge=0)


class PipelineConfig(_Section):
    source: Optional[str] = Field(None, description="default source of the archives (dir, http(s)://, s3://)")
    workdir: Optional[str] = Field(None, description="default work directory")
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    container: ContainerConfig = Field(default_factory=ContainerConfig)
    train: TrainConfig
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    archive: ArchiveConfig
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)


def known_pipelines() -> list[str]:
    """The pipeline config names in configs/pipeline/."""
    return paths.known("pipeline")


def _where(path: Path) -> str:
    try:
        return str(path.relative_to(PROJECT))
    except ValueError:
        return str(path)


def _model_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return model


def _explain(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_model_at(loc).model_fields)
        return f"{key}: unknown key (expected one of: {allowed})"
    if err["type"] == "missing":
        field = _model_at(loc).model_fields.get(str(loc[-1]))
        what = f": {field.description}" if field is not None and field.description else ""
        return f"{key}: required value missing{what}"
    if err["type"] == "value_error":  # our own validators' messages are whole sentences
        return f"{key}: {err['ctx']['error']}"
    msg = err["msg"]
    msg = "expected " + msg[len("Input should be "):] if msg.startswith("Input should be ") else msg
    return f"{key}: {msg}, got {err['input']!r}"


def validate_pipeline(raw: Any, where: str) -> PipelineConfig:
    """`raw` (a parsed YAML document) as a PipelineConfig; a one-line StageError naming every bad key."""
    if not isinstance(raw, dict):
        raise StageError(f"pipeline config {where}: expected a mapping of sections (fetch, pack, ...), "
                         f"got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(_explain(err) for err in e.errors(include_url=False))
        raise StageError(f"pipeline config {where}: {problems}") from None


def read_pipeline(name_or_path: str) -> tuple[PipelineConfig, Path]:
    """The named (or given) pipeline config file, parsed and checked against the schema."""
    path = paths.resolve("pipeline", name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise StageError(f"pipeline config {_where(path)}: not valid YAML{at}: "
                         f"{getattr(e, 'problem', None) or e}") from None
    return validate_pipeline(raw, _where(path)), path


def check_pipeline(name_or_path: str, source: str | None = None, workdir: str | None = None) -> None:
    """What `rn50 run` calls before anything starts: the config exists, matches the schema, and a source
    and a work dir are known (from the arguments or the config)."""
    load_pipeline(name_or_path, source=source, workdir=workdir)


def load_pipeline(name_or_path: str, source: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    """The named pipeline config, checked, as a plain dict; `source`/`workdir` override its defaults."""
    model, path = read_pipeline(name_or_path)
    cfg = model.model_dump()
    source = source or cfg.get("source")
    workdir = workdir or cfg.get("workdir")
    if not source or not workdir:
        raise StageError(f"pipeline {name_or_path!r} needs a source and a workdir (parameters or config)")
    if "://" not in source:
        source = str(PROJECT / source)  # absolute stays absolute: Path("/a") / "/b" == "/b"
    workdir = str(PROJECT / workdir)
    values = {"source": source, "workdir": workdir}
    filled = {k: v if k in values else _fill(v, values, f"pipeline config {_where(path)}: {k}") for k, v in cfg.items()}
    return {**filled, **values}


# A placeholder is `{...}` without braces inside; a lone `{` or `}` (e.g. in a path) is plain text.
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _fill(node: Any, values: dict[str, str], where: str) -> Any:
    """`node` with the literal placeholders {source} and {workdir} replaced. Not str.format: that reads
    attributes ({workdir.__class__}) and chokes on braces in the values; any other placeholder is an error."""
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        def value(m: re.Match) -> str:
            if m.group(1) not in values:
                raise StageError(f"{where}: unknown placeholder {m.group(0)!r} (only {{source}} and {{workdir}} "
                                 f"are filled in)")
            return values[m.group(1)]
        return _PLACEHOLDER.sub(value, node)
    return node
