"""Load and validate params.yaml: one schema for every stage and for the Snakefile.

A bad value must stop the run before any work, with a message that names the key, the value and
what is allowed; jsonschema's own messages name the value, so we add the key path and the rule.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_RESOURCE = "params.schema.json"


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: `1e-05` (no dot) is a number, not a string."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that exponent floats without a dot are floats.

    DVC writes dvc.lock with YAML 1.2 floats (`prob_clip: 1e-05`); PyYAML reads that as the string
    '1e-05', so a param compared against its lock looked changed (cpal-compare marked the CRF column
    stale in every row); a user's `lr: 1e-3` in params.yaml broke the schema the same way.
    """
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class ParamsError(ValueError):
    """params.yaml (or a config derived from it) breaks the schema."""


def schema_path() -> Path:
    """Path of the JSON schema, for Snakemake's validate()."""
    return Path(str(resources.files("cpal").joinpath(SCHEMA_RESOURCE)))


def load_schema() -> dict[str, Any]:
    return json.loads(schema_path().read_text())


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = f"{key}: " if error.absolute_path else ""
        return f"{where}unknown key(s) {', '.join(map(repr, extra))}; allowed keys: {', '.join(allowed)}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        where = f"{key}." if error.absolute_path else ""
        return f"{where}{missing}: missing required key"
    text = f"{key} = {error.instance!r} is invalid: {error.message}"
    hint = error.schema.get("description")
    if hint:
        text += f" ({hint})"
    return text


# The embedded generator's versions and what version 2 adds (cpal/data/embedded.py draws them).
EMBEDDED_VERSIONS = (1, 2)
PHOTO_KEYS = ("shading", "texture", "edge_fade", "clutter_match", "blur", "noise")
# Optional version 2 settings and their values, the first the default (cpal/data/embedded.py says what each does).
PHOTO_OPTIONAL = {"fade": ("surface", "colour")}


def check_embedded_version(c: dict[str, Any]) -> None:
    """data.embedded: `version` is one of EMBEDDED_VERSIONS and `photo` holds exactly what that version uses:
    version 1 no photo settings (null or absent), version 2 every key of PHOTO_KEYS (PHOTO_OPTIONAL may
    be left out)."""
    version, photo = c.get("version", 1), c.get("photo")
    allowed = ", ".join(str(v) for v in EMBEDDED_VERSIONS)
    if isinstance(version, bool) or version not in EMBEDDED_VERSIONS:
        raise ValueError(f"data.embedded.version = {version!r}: allowed versions are {allowed} "
                         "(1 flat colours, 2 photo-like surfaces and optics)")
    if version == 1:
        if photo is not None:
            raise ValueError(f"data.embedded.photo is a setting of version 2; version 1 does not use it: set "
                             f"data.embedded.photo: null, or data.embedded.version: 2 (allowed versions: {allowed})")
        return
    if not isinstance(photo, dict):
        raise ValueError(f"data.embedded.version 2 needs data.embedded.photo with keys {', '.join(PHOTO_KEYS)}")
    extra = sorted(set(photo) - set(PHOTO_KEYS) - set(PHOTO_OPTIONAL))
    missing = [k for k in PHOTO_KEYS if k not in photo]
    if extra or missing:
        raise ValueError(f"data.embedded.photo: unknown key(s) {extra}, missing {missing}; version 2 uses "
                         f"{', '.join(PHOTO_KEYS)} and optionally {', '.join(PHOTO_OPTIONAL)}")
    for key, allowed_values in PHOTO_OPTIONAL.items():
        if key in photo and photo[key] not in allowed_values:
            raise ValueError(f"data.embedded.photo.{key} = {photo[key]!r}: allowed values are "
                             f"{', '.join(allowed_values)}")
    limits = {"shading": 1.0, "texture": 1.0, "edge_fade": 1.0, "clutter_match": 1.0, "blur": 3.0, "noise": 30.0}
    for key, top in limits.items():
        value = photo[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
            raise ValueError(f"data.embedded.photo.{key} = {value!r}: must lie in [0, {top:g}]")


def _cross_checks(params: dict[str, Any]) -> list[str]:
    """Rules that span keys, which JSON schema cannot express."""
    problems = []
    method = params.get("params", {})
    if method.get("K", 0) > method.get("bank_size", float("inf")):
        problems.append(
            f"params.K = {method['K']} is invalid: K must not exceed params.bank_size = {method['bank_size']}"
        )
    emb = params.get("data", {}).get("embedded", {})
    if emb.get("min_objects", 0) > emb.get("max_objects", 3):
        problems.append(
            f"data.embedded.min_objects = {emb['min_objects']} is invalid: "
            f"must not exceed data.embedded.max_objects = {emb['max_objects']}"
        )
    if emb:
        try:
            check_embedded_version(emb)
        except ValueError as error:
            problems.append(str(error))
    folder_classes = (params.get("data", {}).get("folder") or {}).get("classes") or []
    if "background" in folder_classes:
        problems.append("data.folder.classes must not name 'background': id 0 is the background already; list "
                        "only the object classes")
    for key, value in (("data.embedded.object_scale", emb.get("object_scale")),
                       ("train_cls.scale_range", params.get("train_cls", {}).get("scale_range")),
                       ("seg.scale_range", params.get("seg", {}).get("scale_range")),
                       ("amn.scale_range", params.get("amn", {}).get("scale_range"))):
        if isinstance(value, list) and len(value) == 2 and value[0] > value[1]:
            problems.append(f"{key} = {value!r} is invalid: low must not exceed high")
    method = params.get("params", {}).get("method")
    for section in ("crf", "pseudo"):
        if method == "cam" and params.get(section, {}).get("map") == "pacam":
            problems.append(f"{section}.map = 'pacam' is invalid: params.method = 'cam' makes no PACAM (use map: cam)")
    irn = params.get("irn", {})
    fg, bg = irn.get("fg_threshold", 1), irn.get("bg_threshold", 0)
    if isinstance(fg, int | float) and isinstance(bg, int | float) and bg > fg:
        problems.append(f"irn.bg_threshold = {irn['bg_threshold']} is invalid: must not exceed "
                        f"irn.fg_threshold = {irn['fg_threshold']}")
    seeds = params.get("seeds", {})
    seg = params.get("seg", {})
    if seeds and seg and seg.get("train_split") != seeds.get("split"):
        problems.append(
            f"seg.train_split = {seg.get('train_split')!r} is invalid: DeepLab trains on the pseudo-masks, which "
            f"exist only for seeds.split = {seeds.get('split')!r}"
        )
    for section in ("train_cls", "seg"):
        cfg = params.get(section, {})
        if cfg.get("sync_bn") and cfg.get("backbone") == "efficientnet_lite0":
            problems.append(f"{section}.sync_bn = true is invalid with {section}.backbone = 'efficientnet_lite0': "
                            "timm's BatchNormAct2d would lose its activation when converted (use a ResNet or "
                            "sync_bn: false)")
    if seeds.get("bg_threshold_min", 0) > seeds.get("bg_threshold_max", 1):
        problems.append(
            f"seeds.bg_threshold_min = {seeds['bg_threshold_min']} is invalid: "
            f"must not exceed seeds.bg_threshold_max = {seeds['bg_threshold_max']}"
        )
    return problems


SPLIT_KEYS = (("train_cls", "train_split"), ("train_cls", "val_split"), ("seeds", "split"), ("seg", "train_split"),
              ("seg", "val_split"))


def source_splits(data: dict[str, Any]) -> tuple[str, ...] | None:
    """The splits `data.source` writes: the embedded and folder sources train and val; VOC and COCO the
    data.<source>.splits they are given, else every split the schema allows them (their defaults)."""
    source = data.get("source")
    if source in ("embedded", "folder"):
        return ("train", "val")
    if source not in ("voc12", "coco14"):
        return None
    given = (data.get(source) or {}).get("splits")
    if given:
        return tuple(given)
    schema = load_schema()["properties"]["data"]["properties"][source]["properties"]["splits"]
    return tuple(schema["items"]["enum"])


def check_splits(params: dict[str, Any], source: str = "params.yaml") -> None:
    """Refuse a split the data source does not write (a typo in a preset: 'trainaug'), naming the ones it does.

    Run where a run starts (the Snakefile at parse time, the data stage for DVC), not by every stage: a
    benchmark may add a subset split of its own to a written dataset, and VOCDataset names the splits a
    dataset holds when one is missing.
    """
    known = source_splits(params.get("data") or {})
    if known is None:
        return
    problems = []
    for section, key in SPLIT_KEYS:
        value = (params.get(section) or {}).get(key)
        if value is not None and value not in known:
            problems.append(f"{section}.{key} = {value!r} is invalid: data.source {params['data']['source']!r} "
                            f"writes the splits {', '.join(known)}")
    if problems:
        raise ParamsError(f"{source} is invalid:\n  - " + "\n  - ".join(problems))


def validate_params(params: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Raise ParamsError listing every problem; return the params unchanged when valid."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(params).__name__}")
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(params), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = [_describe(e) for e in errors]
    if not problems:
        problems = _cross_checks(params)
    if problems:
        raise ParamsError(f"{source} is invalid:\n  - " + "\n  - ".join(problems))
    return params


def validate_section(name: str, value: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Check one section against its part of the schema (for code handed a section, not a whole file)."""
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema["properties"][name])
    errors = sorted(validator.iter_errors(value), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = []
    for error in errors:
        error.path.appendleft(name)
        problems.append(_describe(error))
    problems += _cross_checks({name: value})
    if problems:
        raise ParamsError(f"{source} is invalid:\n  - " + "\n  - ".join(problems))
    return value


def load_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a params file (load_yaml) and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    try:
        params = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    return validate_params(params, source=str(path))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested merge, override wins; used for presets and Snakemake --configfile overrides."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


RESOLVED_HEADER = "# Snakemake config merged from:"


def write_resolved_params(config: dict[str, Any], path: str, sources: list[str] | None = None) -> str:
    """Write `config` (Snakemake's merged config) to `path` unless it already holds it; return `path`.

    Snakemake's --config/--configfile overrides exist only in memory; stages read a file. Its first line
    names the configfiles merged (``sources``, in order), so the report can quote the command that reproduces
    the run; the stages read the YAML below it.
    """
    header = f"{RESOLVED_HEADER} {shlex.join(sources or ['params.yaml'])}\n"
    text = header + yaml.safe_dump(config, sort_keys=True)
    target = Path(path)
    if not target.is_file() or target.read_text() != text:
        from cpal.core.io import write_text

        write_text(target, text)
    return str(target)
