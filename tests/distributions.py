"""Real, tiny distributions for tests: a ``*.dist-info`` folder with METADATA and
entry_points.txt on sys.path is all importlib.metadata needs, so no import machinery is faked."""
import textwrap
from pathlib import Path


def install(site: Path, dist: str, entry_points: str, modules: dict[str, str] | None = None) -> None:
    """Install distribution ``dist`` 1.2.3 into ``site`` with these entry points and modules."""
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, source in (modules or {}).items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
