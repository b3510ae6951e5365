"""Reading a config: YAML plus dotted overrides, built into the typed tree with one-line errors.

Values of overrides are parsed as YAML scalars (`true`, `1e-3`, `[1, 2]`, `null`). An unknown or
mistyped key, a wrong type or a renamed key is one `FastbondError` naming the key; then the tree
checks itself (`TrainConfig.check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fastbond.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from fastbond.algorithms.sections import AlgorithmSection
from fastbond.config.schema import TrainConfig
from fastbond.errors import FastbondError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a FastbondError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except FastbondError as error:
                errors.append(error)
        raise errors[0]
    if origin is dict:  # a mapping of names (frontier.runs)
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise FastbondError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise FastbondError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise FastbondError(f"config key '{key}' must be a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `3e-6` (no dot) as a string; accept what float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise FastbondError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


# Keys that moved, by their old dotted name: an old config gets a pointer instead of a guess.
# Keys renamed in place: a saved config (checkpoint, run directory) is read under the new name; a user's gets
# the line of MOVED_KEYS below.
RENAMED_KEYS = {"rollout.engine": "rollout.backend", "rollout.sampler": "rollout.noise"}
MOVED_KEYS = {
    **{old: f"config key '{old}' is now '{new}' ('engine' names only how the policy is trained)"
       for old, new in RENAMED_KEYS.items()},
    "anchor": "config section 'anchor' has moved: anchor.eta is now algorithm.eta (J-BOND's anchor EMA rate)",
    "algorithm.bonbon_alpha":
        "config key 'algorithm.bonbon_alpha' has moved: use algorithm.alpha (algorithm.name=bonbon)",
}


def _unknown_key(key: str, name: str, known: list[str], prefix: str) -> FastbondError:
    if key in MOVED_KEYS:
        return FastbondError(MOVED_KEYS[key])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return FastbondError(f"unknown config key '{key}'{hint}")


def _algorithm_section(values: Any, key: str) -> AlgorithmSection:
    """The section of the algorithm `values["name"]` names; a key it does not use is an error naming it."""
    if not isinstance(values, dict):
        raise FastbondError(f"config key '{key}' must be a section (a mapping), got {values!r}")
    name = values.get("name", DEFAULT_ALGORITHM)
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise FastbondError(f"config key '{key}.name' must be one of {', '.join(ALGORITHMS)}; got {name!r}")
    section = ALGORITHMS[name].section
    own = [f.name for f in dataclasses.fields(section)]
    for item in values:
        if item in own:
            continue
        dotted = f"{key}.{item}"
        if dotted in MOVED_KEYS:
            raise FastbondError(MOVED_KEYS[dotted])
        users = [other for other, entry in ALGORITHMS.items()
                 if item in {f.name for f in dataclasses.fields(entry.section)}]
        keys = ", ".join(k for k in own if k != "name")
        if users:
            raise FastbondError(f"config key '{dotted}' is not used by algorithm {name} (it is {'/'.join(users)}'s); "
                                f"{name} takes: {keys}")
        close = difflib.get_close_matches(str(item), own, n=1)
        hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
        raise FastbondError(f"unknown config key '{dotted}' for algorithm {name}{hint}; it takes: {keys}")
    return _build(section, values, prefix=f"{key}.")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise _unknown_key(key, str(name), list(known), prefix)
        tp = hints[name]
        if tp is AlgorithmSection:
            kwargs[name] = _algorithm_section(value, key)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise FastbondError(f"config key '{key}' must be a section (a mapping), got {value!r}")
            kwargs[name] = _build(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


_STR_TAG, _BOOL_TAG, _MERGE_TAG = (f"tag:yaml.org,2002:{name}" for name in ("str", "bool", "merge"))


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, strict about keys. PyYAML keeps the last of a repeated key
    without a word, so the value a reader finds first is not the one in effect; and it reads
    `on:`, `yes:` or `1:` as a boolean or a number, which no config key is. Either is an error
    naming the key, its section and (in a file) its lines."""

    source = "config"  # what an error names first: the file, or the override
    section = ""  # the dotted section the text is the value of ("" for a whole file)
    lines = True  # name lines (a file's); an override is one line

    def construct_document(self, node):
        # A nested mapping is built after its parent's construct_mapping returns, so it cannot
        # learn its section from there: every section is named here, before construction.
        self.sections: dict[int, str] = {}
        self._name_sections(node, self.section)
        return super().construct_document(node)

    def _name_sections(self, node: yaml.Node, name: str) -> None:
        if not isinstance(node, yaml.CollectionNode) or id(node) in self.sections:
            return  # a scalar, or a node met again through an alias
        self.sections[id(node)] = name
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name_sections(item, f"{name}[{i}]")
            return
        for key, value in node.value:
            if key.tag == _STR_TAG:
                self._name_sections(value, f"{name}.{key.value}" if name else key.value)

    def construct_mapping(self, node, deep=False):
        section = self.sections.get(id(node), "")
        place = f"in section {section}" if section else "at the top level"
        first_lines: dict[str, int] = {}
        for key, _ in node.value:
            if key.tag == _MERGE_TAG:
                continue  # `<<: *defaults` merges a mapping in, whose keys this one may override
            line = key.start_mark.line + 1
            at = f" line {line}" if self.lines else ""
            if key.tag == _BOOL_TAG:
                value = str(self.construct_object(key)).lower()
                raise FastbondError(f"{self.source}{at}: key '{key.value}' {place} was read by YAML as the boolean "
                                    f"{value}; quote it ('{key.value}':) or use the key's real name")
            if key.tag != _STR_TAG:
                written = " ".join(self.buffer[key.start_mark.index:key.end_mark.index].split())
                raise FastbondError(f"{self.source}{at}: key {written} {place} is not a name; "
                                    "config keys are names (docs/config.md lists them)")
            if key.value in first_lines:
                lines = f" (lines {first_lines[key.value]} and {line})" if self.lines else ""
                raise FastbondError(f"{self.source}: key '{key.value}' appears twice {place}{lines}; keep one")
            first_lines[key.value] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, source: str, section: str = "") -> Any:
    """`yaml.safe_load(text)` through `_ConfigLoader`; `source` and `section` name where the text came from."""
    loader = _ConfigLoader(text)
    loader.source, loader.section, loader.lines = source, section, not section
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FastbondError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-5", "algorithm.name=bond"]` → a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FastbondError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-5)")
        try:
            value = _load_yaml(text, f"override '{item}'", section=key) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key, value)
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, section by section (nested dicts merge; anything else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FastbondError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FastbondError(f"config file {path} is not valid UTF-8 text") from None
    try:
        loaded = _load_yaml(text, f"config file {path}")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise FastbondError(f"config file {path}{where} is not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise FastbondError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _choose_algorithm(tree: dict[str, Any], overrides: dict[str, Any]) -> str | None:
    """Config-group semantics for `algorithm`: an override naming another algorithm than the
    file's starts that algorithm from its own defaults, since the file's keys were written for
    its own algorithm. Drops them from `tree`; returns a note saying so, or None."""
    chosen = overrides.get("algorithm", {}).get("name") if isinstance(overrides.get("algorithm"), dict) else None
    section = tree.get("algorithm")
    if chosen is None or not isinstance(section, dict):
        return None
    written_for = section.get("name", DEFAULT_ALGORITHM)
    if written_for == chosen:
        return None
    dropped = [f"algorithm.{key}" for key in section if key != "name"]
    tree["algorithm"] = {}
    if not dropped:
        return None
    return f"algorithm.name={chosen}: the config file's {written_for} settings do not apply ({', '.join(dropped)})"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, check_paths: bool = True,
    notes: list[str] | None = None,
) -> TrainConfig:
    """The validated config of a run: defaults ← YAML file ← dotted overrides.

    `check_paths=False` skips the checks that model and data paths exist, for
    commands that only read the config (`fastbond plan` on another machine).
    An override `algorithm.name=X` with a file written for another algorithm
    runs X from its own defaults plus the overrides' `algorithm.*` keys; the
    note saying what was dropped goes to `notes` when given.
    """
    tree = read_yaml(path) if path is not None else {}
    override_tree = parse_overrides(overrides or [])
    note = _choose_algorithm(tree, override_tree)
    if note and notes is not None:
        notes.append(note)
    config = _build(TrainConfig, merge_trees(tree, override_tree))
    config.check(environment=check_paths)
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) that `load_config` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
