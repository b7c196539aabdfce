"""Configuration presets and the loading of a run configuration (preset < file < overrides).

A preset is a YAML file shipped in ``ccdrec/presets`` (``yelp``, ``gowalla``, ``paper-yelp``,
``quick``); a user file is YAML (or TOML) with the same fields as :class:`ccdrec.config.RunConfig`;
overrides are ``dotted.key=value`` strings whose value is parsed as YAML (``student.update.epochs=5``,
``teacher.members=[{kind: mf, dim: 16}]``). Every field is validated; unknown keys are errors.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from ccdrec.config import RunConfig, validation_message
from ccdrec.data.stream import resolve_source
from ccdrec.errors import CcdrecError

DATASET_PRESET = {"yelp": "yelp", "gowalla": "gowalla"}


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ccdrec.presets").iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict:
    path = resources.files("ccdrec.presets") / f"{name}.yaml"
    if not path.is_file():
        raise CcdrecError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


def read_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CcdrecError(f"{path}: configuration file is missing")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise CcdrecError(f"{path}: cannot be parsed ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CcdrecError(f"{path}: a configuration file must hold a mapping of fields")
    return data


def merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(data: dict, item: str) -> dict:
    if "=" not in item:
        raise CcdrecError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {int(part) if part.isdigit() else part: nested}
    return merge(data, nested)


def load_config(
    dataset: str | Path | None = None,
    preset: str | None = None,
    file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Resolve a run configuration: the preset (default: the dataset's), then ``file``, then overrides.

    ``dataset``: a bundled name, or a stream directory (a :class:`~pathlib.Path` always is one), stored
    as an absolute path (:func:`ccdrec.data.stream.resolve_source`)."""
    # start from every default, so that a partial section (``base: {epochs: 60}``) overrides one field
    data: dict = RunConfig().model_dump()
    bundled = dataset if isinstance(dataset, str) else None  # a Path is a directory, never a bundled name
    name = DATASET_PRESET.get(bundled or "yelp", "yelp") if preset is None else preset
    data = merge(data, read_preset(name))
    if file is not None:
        data = merge(data, read_file(file))
    if dataset is not None:
        data["dataset"] = resolve_source(dataset)  # a directory as an absolute path: the run works from anywhere
    for item in overrides:
        data = apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise CcdrecError(f"invalid configuration: {validation_message(e)}") from None
