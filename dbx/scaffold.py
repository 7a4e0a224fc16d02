"""``dbx plugins new KIND NAME``: write a ready-to-install plugin package from a template.

KIND is one of ``policy``, ``estimator``, ``model``, ``dataset``. The templates live in
``dbx/templates/common/`` (the packaging, the same for every kind) and ``dbx/templates/<kind>/``
(the plugin's module, its tests, an example spec and a README), as plain files with
``${placeholders}`` (``string.Template``); the path parts ``MODULE`` and ``NAME`` are replaced too.
The result installs with ``pip install -e``, registers its entry point, passes its own tests at
once and its example spec trains.
"""
from __future__ import annotations

import keyword
import re
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterator

import dbx
from dbx import registry
from dbx.errors import UserError

__all__ = ["KINDS", "new_package", "new_policy_package", "package_names"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: kind -> (what it is, in words; the spec section that names it; the entry point names a class?)
KINDS: dict[str, tuple[str, str, bool]] = {
    "policy": ("batch-size policy", "policy", True),
    "estimator": ("gradient-diversity estimator", "estimator", True),
    "model": ("model", "model", False),
    "dataset": ("dataset", "data", False),
}


def package_names(name: str, kind: str = "policy") -> dict[str, str]:
    """The names derived from a plugin name: ``my_rule`` -> dist ``dbx-my-rule``, module
    ``dbx_my_rule``, class ``MyRule``; ``target`` is what the entry point names (the class for a
    policy or estimator, the factory function ``my_rule`` for a model or dataset)."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise UserError(f"plugin name {name!r} must be lowercase letters, digits and underscores, starting with a "
                        f"letter (it is what a spec names, e.g. {KINDS[kind][1]}: {{name: my_{kind}}})")
    title, section, is_class = KINDS[kind]
    class_name = "".join(part.capitalize() for part in name.split("_") if part)
    return {
        "name": name,
        "dist": "dbx-" + name.replace("_", "-"),
        "module": f"dbx_{name}",
        "class_name": class_name,
        "target": class_name if is_class else name,
        "kind": kind,
        "title": title,
        "section": section,
        "group": registry.GROUPS[kind],
        "dbx_version": dbx.__version__,
    }


def new_package(kind: str, name: str, directory: str | Path = ".") -> Path:
    """Create ``<directory>/dbx-<name>/``: a plugin package of ``kind``. Returns its folder."""
    if kind not in KINDS:
        raise UserError(f"unknown plugin kind {kind!r}; choose one of {', '.join(KINDS)}")
    names = package_names(name, kind)
    _refuse_taken_name(kind, name)
    folder = Path(directory) / names["dist"]
    if folder.exists():
        raise UserError(f"{folder} already exists; choose another --dir or remove it")
    files = dict(_render("common", names)) | dict(_render(kind, names))
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def new_policy_package(name: str, directory: str | Path = ".") -> Path:
    """``new_package("policy", ...)``, kept for callers of the first release."""
    return new_package("policy", name, directory)


def _refuse_taken_name(kind: str, name: str) -> None:
    """A name another installed package already registers would conflict once installed."""
    try:
        taken = registry.available(kind)
    except UserError:  # a conflict elsewhere in the group is not this command's business
        return
    if name in taken:
        info = taken[name]
        raise UserError(f"{kind} name {name!r} is already registered by {info.distribution} {info.version} "
                        f"({info.target}); choose another name, or two packages would claim it")


def _render(folder: str, names: dict[str, str]) -> Iterator[tuple[str, str]]:
    root = resources.files("dbx").joinpath("templates", folder)
    for relative, template in _walk(root, ""):
        target = relative.removesuffix(".tmpl").replace("MODULE", names["module"]).replace("NAME", names["name"])
        yield target, Template(template.read_text()).substitute(names)


def _walk(node, prefix: str):  # noqa: ANN001, ANN202 - importlib.resources.abc.Traversable
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name == "__pycache__":
            continue
        path = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _walk(child, path + "/")
        elif child.name.endswith(".tmpl"):
            yield path, child
