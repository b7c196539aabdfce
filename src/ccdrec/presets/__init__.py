"""Configuration presets and the loading of a run configuration (preset < file < overrides).

A preset is a YAML file shipped in ``ccdrec/presets`` (``yelp``, ``gowalla``, ``paper-yelp``,
``quick``); a user file is YAML (or TOML) with the same fields as :class:`ccdrec.config.RunConfig`;
overrides are ``dotted.key=value`` strings whose value is parsed as YAML (``student.update.epochs=5``,
``teacher.members=[{kind: mf, dim: 16}]``). Every field is validated; unknown keys are errors.
"""

from __future__ import annotations

import os
import re
import tomllib
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from ccdrec.config import DECIMAL, RunConfig, block_numbers, validation_message
from ccdrec.data.stream import resolve_source
from ccdrec.errors import CcdrecError, WrongArgumentType

DATASET_PRESET = {"yelp": "yelp", "gowalla": "gowalla"}


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ccdrec.presets").iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a mapping naming a key twice (``seed: 3`` then ``seed: 4``; ``1`` and
    ``"1"`` in ``blocks``) is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            # by text ("1" and 1) and by value (1 and 1.0, which a dict takes for one key)
            for form in (str(key), key) if isinstance(key, int | float) else (str(key),):
                if form in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {str(key)!r} is given twice (lines {seen[form] + 1} and {key_node.start_mark.line + 1})"
                    )
            for form in (str(key), key) if isinstance(key, int | float) else (str(key),):
                seen[form] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 010 as 8 (octal), 0x10 as 16 and 1:30 as 90, so `epochs: 010` trained 8 epochs without a
# word. Here a whole number is decimal digits only, read in base 10 (010 is 10); the other forms stay text,
# which a number field refuses (0x10, 1:30).
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_UniqueKeyLoader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node), 10))
_UniqueKeyLoader.add_implicit_resolver(  # YAML 1.1's floats without the base-60 form (1:30.0 was 90.0)
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def dataset_preset(dataset: str | Path | None) -> str | None:
    """The preset a run takes when none is named: a bundled dataset's own (``yelp``, ``gowalla``; no
    dataset at all is Yelp's), and none for a stream directory of the user's (a :class:`~pathlib.Path`,
    or a name that is not bundled): it starts from the library's defaults, under which early stopping,
    not a dataset's time budget, decides when block 0's teachers are trained."""
    if dataset is None:
        return DATASET_PRESET["yelp"]
    return DATASET_PRESET.get(dataset) if isinstance(dataset, str) else None


def read_preset(name: str) -> dict:
    """The bundled preset ``name`` (one of :func:`preset_names`: a name, never a path)."""
    if not isinstance(name, str) or name not in preset_names():
        raise CcdrecError(f"unknown preset {name!r:.60}; available: {', '.join(preset_names())}")
    path = resources.files("ccdrec.presets") / f"{name}.yaml"
    if not path.is_file():
        raise CcdrecError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _yaml(path.read_text()) or {}


def read_file(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise CcdrecError(f"{path}: a directory; --config takes a YAML or TOML file")
    if not path.is_file():
        if path.exists():  # /dev/null, a pipe: nothing a run could read again on --resume
            raise CcdrecError(f"{path}: not a regular file; --config takes a YAML or TOML file")
        raise CcdrecError(f"{path}: configuration file is missing")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the text (TOML refused it)
    except UnicodeDecodeError:
        raise CcdrecError(f"{path}: not UTF-8 text; --config takes a YAML or TOML file") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        data = _yaml(text)
    except tomllib.TOMLDecodeError as e:
        raise CcdrecError(f"{path}: cannot be parsed as TOML ({str(e).splitlines()[0]}){_yaml_hint(path, text)}") from None
    except ValueError as e:  # an integer of thousands of digits: Python refuses to convert it
        raise CcdrecError(f"{path}: {_too_long(e)}") from None
    except yaml.YAMLError as e:
        raise CcdrecError(f"{path}: cannot be parsed as YAML ({_yaml_problem(e)}){_toml_hint(path, text)}") from None
    if data is None:  # empty, or comments only: no field changed
        return {}
    if not isinstance(data, dict):
        raise CcdrecError(f"{path}: a configuration file must hold a mapping of fields{_toml_hint(path, text)}")
    return data


def _yaml_hint(path: Path, text: str) -> str:
    """A hint for a YAML file named .toml (``seed: 3``), else ''."""
    try:
        if not isinstance(_yaml(text), dict):
            return ""
    except (yaml.YAMLError, ValueError):
        return ""
    return f"; it reads as YAML: name it {path.with_suffix('.yaml').name}"


def _toml_hint(path: Path, text: str) -> str:
    """A hint for a TOML file read as YAML (its name does not end in .toml), else ''. Such a file fails as
    YAML (``[teacher]`` then ``lwc_weight = 0.01``) or reads as one string (``seed = 3``)."""
    try:
        if not tomllib.loads(text):
            return ""
    except (tomllib.TOMLDecodeError, ValueError):
        return ""
    return f"; it reads as TOML: name it {path.with_suffix('.toml').name} (TOML is read from files ending in .toml)"


def _too_long(e: ValueError) -> str:
    if "digits" in str(e):
        return "a number of thousands of digits; no setting takes one that large"
    return f"a value that cannot be read ({str(e).splitlines()[0]})"


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is (line and column, 1-based): its first line alone names neither."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    context = getattr(e, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    opened = getattr(e, "context_mark", None)
    if opened is not None and mark is not None and opened.line != mark.line:
        where += f" (begun at line {opened.line + 1}, column {opened.column + 1})"
    return f"{context + ': ' if context else ''}{problem}{where}"


def merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def block_keys(layer: dict, where: str) -> dict:
    """``layer`` with the keys of its ``blocks`` mapping as block numbers (:func:`ccdrec.config.block_numbers`),
    so that a TOML file's string keys, a stored ``config.yaml``'s and a preset's integer keys name one block
    when the layers are merged (the later one's fields winning). Two keys of one block in one layer, or a key
    ``true`` / ``1.0``, are an error naming the layer (``where``)."""
    blocks = layer.get("blocks") if isinstance(layer, dict) else None
    if not isinstance(blocks, dict):
        return layer
    try:
        return {**layer, "blocks": block_numbers(blocks)}
    except ValueError as e:
        raise CcdrecError(f"{where}: {e}") from None


def canonical_key(key: str) -> str:
    """A dotted override key with its block numbers as numbers (``blocks.01.w_stability`` -> ``blocks.1.w_stability``)."""
    return ".".join(str(int(part)) if DECIMAL.fullmatch(part) else part for part in key.split("."))


def override_key(item: str) -> str:
    """The dotted key of an override ``key.sub=value``; CcdrecError when it names none."""
    if "=" not in item:
        raise CcdrecError(f"override {item!r} must look like key.sub=value")
    key = item.split("=", 1)[0].strip()
    if not key or not all(part.strip() for part in key.split(".")):
        raise CcdrecError(f"override {item!r} names no field before '=' (key.sub=value)")
    return key


def apply_override(data: dict, item: str) -> dict:
    key = override_key(item)
    raw = item.split("=", 1)[1]
    try:
        value = _yaml(raw)
    except yaml.YAMLError as e:
        if raw.strip()[:1] in ("[", "{"):  # meant as a list or a mapping: not read as text
            raise CcdrecError(f"override {key}=...: {raw.strip()!r} cannot be parsed ({_yaml_problem(e)})") from None
        value = raw
    except ValueError as e:  # an integer of thousands of digits: Python refuses to convert it
        raise CcdrecError(f"override {key}=...: {_too_long(e)}") from None
    parts = key.split(".")
    at = data
    for depth, part in enumerate(parts[:-1]):  # a list is set whole: teacher.members=[...], not teacher.members.0.dim
        at = at.get(int(part) if DECIMAL.fullmatch(part) else part) if isinstance(at, dict) else None
        if isinstance(at, list):
            whole = ".".join(parts[: depth + 1])
            raise CcdrecError(f"override {item!r}: {whole} is a list; set it whole (--set '{whole}=[...]')")
    nested: dict = value
    for part in reversed(parts):
        nested = {int(part) if DECIMAL.fullmatch(part) else part: nested}
    return merge(data, block_keys(nested, f"override {key}=..."))


def load_config(
    dataset: str | Path | None = None,
    preset: str | None = None,
    file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Resolve a run configuration: the preset (default: the dataset's), then ``file``, then overrides.

    ``dataset``: a bundled name, or a stream directory (a :class:`~pathlib.Path` always is one), stored
    as an absolute path (:func:`ccdrec.data.stream.resolve_source`)."""
    for what, given in (("dataset", dataset), ("file", file)):
        if given is not None and not isinstance(given, str | os.PathLike):
            raise WrongArgumentType(f"{what} must be a name or a path, not {type(given).__name__}")
        if given is not None and not str(given).strip():  # Path("") would be ".", the current directory
            raise CcdrecError(f"the {what} path is empty")
    if (
        isinstance(overrides, str | bytes)
        or not isinstance(overrides, list | tuple)
        or not all(isinstance(o, str) for o in overrides)
    ):
        raise WrongArgumentType(f"overrides must be a list of 'key.sub=value' strings, not {overrides!r:.60}")
    # start from every default, so that a partial section (``base: {epochs: 60}``) overrides one field
    data: dict = RunConfig().model_dump()
    from_file = read_file(file) if file is not None else {}
    if isinstance(named := from_file.get("dataset"), str):  # the file names the stream
        if dataset is None:
            dataset = named  # a bundled name, or a directory (relative to the working directory)
        elif resolve_source(named) != resolve_source(dataset):
            raise CcdrecError(f"{file} names the dataset {named!r} and the command line {str(dataset)!r}: give one of them")
    name = preset if preset is not None else dataset_preset(dataset)
    if name is not None:
        data = merge(data, block_keys(read_preset(name), f"preset {name}"))
    data = merge(data, block_keys(from_file, str(file)))
    if dataset is not None:
        data["dataset"] = resolve_source(dataset)  # a directory as an absolute path: the run works from anywhere
    keys = [canonical_key(override_key(item)) for item in overrides]  # blocks.1.x and blocks.01.x: one field
    for key in {k for k in keys if keys.count(k) > 1}:
        raise CcdrecError(f"--set names {key} twice; give it once")
    for key in keys:  # a whole mapping and one of its fields: teacher.base={epochs: 2} and teacher.base.epochs=3
        if inner := next((k for k in keys if k.startswith(key + ".")), None):
            raise CcdrecError(f"--set names {inner} twice (also inside {key}=...); give it once")
    for item in overrides:
        data = apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise CcdrecError(f"invalid configuration: {validation_message(e)}") from None
