"""``dbx plugins new policy NAME``: write a ready-to-install plugin package from a template.

The templates live in ``dbx/templates/<kind>/`` as plain files with ``${placeholders}``
(``string.Template``); the path parts ``MODULE`` and ``NAME`` are replaced too. The result installs
with ``pip install -e``, registers its entry point, and passes its own tests at once.
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

__all__ = ["new_policy_package", "package_names"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def package_names(name: str) -> dict[str, str]:
    """The names derived from a plugin name: ``my_rule`` -> dist ``dbx-my-rule``, module
    ``dbx_my_rule``, class ``MyRule``."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise UserError(f"plugin name {name!r} must be lowercase letters, digits and underscores, starting with a "
                        f"letter (it is what a spec names, e.g. policy: {{name: my_rule}})")
    return {
        "name": name,
        "dist": "dbx-" + name.replace("_", "-"),
        "module": f"dbx_{name}",
        "class_name": "".join(part.capitalize() for part in name.split("_") if part),
        "dbx_version": dbx.__version__,
    }


def new_policy_package(name: str, directory: str | Path = ".") -> Path:
    """Create ``<directory>/dbx-<name>/``: a policy plugin package. Returns its folder."""
    names = package_names(name)
    _refuse_taken_name("policy", name)
    folder = Path(directory) / names["dist"]
    if folder.exists():
        raise UserError(f"{folder} already exists; choose another --dir or remove it")
    files = dict(_render("policy", names))
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


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


def _render(kind: str, names: dict[str, str]) -> Iterator[tuple[str, str]]:
    root = resources.files("dbx").joinpath("templates", kind)
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
