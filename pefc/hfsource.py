"""What transformers' classes take, read from transformers' source files without importing it.

``import transformers`` costs seconds and a config or model class pulls in torch, so the checks
``pefc validate`` runs on an ``hf`` model section read the source instead: the auto tables
(``models/auto/*.py``) name every model class with its model type and config class, the config
classes declare their keys as annotated fields (transformers 5) or ``__init__`` parameters, and a
model class's ``forward`` signature names its inputs. Base classes are followed through the
imports of each file. Whatever cannot be read this way is reported as unknown (``None``), never
guessed: the checks then leave it to the build, which sees the real classes.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_MAX_DEPTH = 12  # base classes followed at most


@dataclass(frozen=True)
class Signature:
    """The keyword names a callable takes, and whether it also takes ``**kwargs``."""

    names: tuple[str, ...]
    var_keyword: bool


@lru_cache(maxsize=1)
def package_root() -> Path | None:
    """transformers' package folder (found, not imported), or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def model_classes() -> set[str]:
    """Every model class the auto tables name (``LlamaForCausalLM``, ``BertModel``, ...)."""
    return set(_tables()[0])


def config_keys(class_name: str) -> set[str] | None:
    """The keys the config class of model ``class_name`` declares (fields, ``__init__`` parameters and
    ``attribute_map`` aliases, with those of its bases), or None if the source does not tell."""
    found = _config_class(class_name)
    if found is None:
        return None
    keys: set[str] = set()
    for node, _ in _class_chain(*found):
        keys |= _declared_keys(node)
    return keys


def config_class_name(class_name: str) -> str | None:
    """The name of model ``class_name``'s config class (``LlamaConfig``), or None if the source does not tell."""
    found = _config_class(class_name)
    return found[1] if found is not None else None


def forward_signature(class_name: str) -> Signature | None:
    """The inputs ``class_name.forward`` takes, from the first class of its chain that defines it."""
    path = _modeling_file(class_name)
    if path is None:
        return None
    for node, _ in _class_chain(path, class_name):
        method = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
        if method is not None:
            args = method.args
            names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.arg != "self"]
            return Signature(tuple(names), args.kwarg is not None)
    return None


# --- the auto tables -------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """(model class -> its model types, model type -> config class, model type -> module folder)."""
    root = package_root()
    classes: dict[str, list[str]] = {}
    configs: dict[str, str] = {}
    folders: dict[str, str] = {}
    if root is None:
        return classes, configs, folders
    for path in sorted((root / "models" / "auto").glob("*.py")):
        for name, table in _literal_tables(path).items():
            if name == "CONFIG_MAPPING_NAMES":
                configs.update({k: v for k, v in table.items() if isinstance(v, str)})
            elif name == "SPECIAL_MODEL_TYPE_TO_MODULE_NAME":
                folders.update({k: v for k, v in table.items() if isinstance(v, str)})
            elif name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES"):
                for model_type, value in table.items():
                    for cls in (value,) if isinstance(value, str) else value if isinstance(value, tuple) else ():
                        if isinstance(cls, str) and model_type not in classes.setdefault(cls, []):
                            classes[cls].append(model_type)
    return classes, configs, folders


def _literal_tables(path: Path) -> dict[str, dict[str, object]]:
    """Module-level ``NAME = OrderedDict([...])`` / ``{...}`` tables of literals in ``path``."""
    tables: dict[str, dict[str, object]] = {}
    for node in _parse(path).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "OrderedDict" and value.args:
            value = value.args[0]
        try:
            literal = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        pairs = literal.items() if isinstance(literal, dict) else literal if isinstance(literal, (list, tuple)) else ()
        try:
            tables[node.targets[0].id] = dict(pairs)
        except (TypeError, ValueError):
            continue
    return tables


def _model_folder(class_name: str) -> tuple[Path, str] | None:
    """The folder of the model type whose modeling file defines ``class_name``, and that model type."""
    root = package_root()
    classes, _, folders = _tables()
    for model_type in classes.get(class_name, []) if root is not None else []:
        folder = root / "models" / folders.get(model_type, model_type.replace("-", "_"))  # type: ignore[operator]
        path = folder / f"modeling_{folder.name}.py"
        if path.is_file() and any(isinstance(n, ast.ClassDef) and n.name == class_name for n in _parse(path).body):
            return folder, model_type
    return None


def _modeling_file(class_name: str) -> Path | None:
    found = _model_folder(class_name)
    return found[0] / f"modeling_{found[0].name}.py" if found is not None else None


def _config_class(class_name: str) -> tuple[Path, str] | None:
    found = _model_folder(class_name)
    config_name = _tables()[1].get(found[1]) if found is not None else None
    if found is None or config_name is None:
        return None
    path = found[0] / f"configuration_{found[0].name}.py"
    return (path, config_name) if path.is_file() else None


# --- classes in source files -----------------------------------------------------------------------

@lru_cache(maxsize=64)
def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ast.Module(body=[], type_ignores=[])


def _class_chain(path: Path, name: str, depth: int = 0) -> list[tuple[ast.ClassDef, Path]]:
    """The class ``name`` of ``path`` and its bases that the source tree resolves, nearest first."""
    module = _parse(path)
    node = next((n for n in module.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None or depth > _MAX_DEPTH:
        return []
    chain = [(node, path)]
    for base in node.bases:
        base_name = base.id if isinstance(base, ast.Name) else None
        where = _defining_file(module, path, base_name) if base_name else None
        if where is not None:
            chain += _class_chain(where, base_name, depth + 1)  # type: ignore[arg-type]
    return chain


def _defining_file(module: ast.Module, path: Path, name: str) -> Path | None:
    """The file that defines ``name`` as seen from ``path``: itself, or where a relative import takes it from."""
    if any(isinstance(n, ast.ClassDef) and n.name == name for n in module.body):
        return path
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.level and any((a.asname or a.name) == name for a in node.names):
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*(node.module or "").split("."))
            for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def _declared_keys(node: ast.ClassDef) -> set[str]:
    """Annotated fields (not ClassVar), ``__init__`` keyword names and ``attribute_map`` keys of a class body."""
    keys: set[str] = set()
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and "ClassVar" not in ast.dump(item.annotation):
            keys.add(item.target.id)
        elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
            keys |= {a.arg for a in [*item.args.args, *item.args.kwonlyargs] if a.arg != "self"}
        elif isinstance(item, (ast.Assign, ast.AnnAssign)):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            if any(isinstance(t, ast.Name) and t.id == "attribute_map" for t in targets) and item.value is not None:
                with contextlib.suppress(ValueError, TypeError, SyntaxError):
                    keys |= set(ast.literal_eval(item.value))
    return keys
