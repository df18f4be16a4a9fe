"""The local models the web app offers: base models, controls and LoRAs, each under a short unique name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from ..errors import ControlNextError
from ..pipelines.base import BUNDLED_CONTROLS, DEFAULT_BASE

Kind = Literal["base", "control", "lora"]
SCAN_DEPTH = 2  # a models folder, its children and grandchildren (e.g. models/controls/canny)


@dataclass(frozen=True)
class ModelEntry:
    """One model the app can load: `path` is what the loaders take, `name` is what users pick."""

    name: str
    path: str
    kind: Kind
    source: str  # embedded, bundled, models-dir, command-line, demo


@dataclass
class ModelCatalog:
    """Everything found at start-up; requests may only name these models (never arbitrary paths)."""

    bases: list[ModelEntry] = field(default_factory=list)
    controls: list[ModelEntry] = field(default_factory=list)
    loras: list[ModelEntry] = field(default_factory=list)

    @classmethod
    def discover(
        cls,
        models_dirs: Iterable[str | Path] = (),
        bases: Iterable[str | Path] = (),
        controls: Iterable[str | Path] = (),
        loras: Iterable[str | Path] = (),
        demo: Iterable[tuple[Kind, str | Path]] = (),
        include_embedded: bool = True,
    ) -> "ModelCatalog":
        """The shipped models first (embedded base, bundled controls), then `models_dirs` scans, explicit paths, demo."""
        found: dict[Kind, list[tuple[str, str]]] = {"base": [], "control": [], "lora": []}
        if include_embedded and (DEFAULT_BASE / "model_index.json").is_file():
            found["base"].append((str(DEFAULT_BASE), "embedded"))
        if include_embedded and BUNDLED_CONTROLS.is_dir():
            found["control"] += [(str(p), "bundled") for p in sorted(BUNDLED_CONTROLS.iterdir())
                                 if p.is_dir() and is_control(p)]
        for folder in models_dirs:
            folder = Path(folder).expanduser()
            if not folder.is_dir():
                raise ControlNextError(f"models folder not found: {folder}")
            for kind, path in scan(folder, SCAN_DEPTH):
                found[kind].append((str(path), "models-dir"))
        for kind, paths in (("base", bases), ("control", controls), ("lora", loras)):
            for path in paths:
                found[kind].append((check_explicit(kind, str(path)), "command-line"))
        for kind, path in demo:
            found[kind].append((str(path), "demo"))
        catalog = cls()
        for kind, items in found.items():
            getattr(catalog, kind + "s").extend(named_entries(kind, items))
        return catalog

    def entries(self, kind: Kind) -> list[ModelEntry]:
        return getattr(self, kind + "s")

    def find(self, kind: Kind, name: str | None) -> ModelEntry:
        """The entry called `name` (or with that path); None means the first base model."""
        entries = self.entries(kind)
        if name is None and kind == "base" and entries:
            return entries[0]
        for entry in entries:
            if name in (entry.name, entry.path):
                return entry
        if not entries:
            hint = "start the server with --models-dir, --base or --control" if kind != "lora" else "start it with --lora"
            raise ControlNextError(f"no {kind} models are available on this server; {hint}")
        known = ", ".join(e.name for e in entries)
        raise ControlNextError(f"unknown {kind} model {name!r}; this server has: {known} (see /api/models)")


def is_base_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def is_control(path: Path) -> bool:
    """A folder or file that a registered control method recognises (ours, a release, a diffusers ControlNet)."""
    from ..methods import control_method

    try:
        return control_method(path) is not None
    except ControlNextError:  # unreadable files are not offered; loading them would fail anyway
        return False


def safetensors_kind(path: Path) -> Kind | None:
    """A LoRA (keys name lora layers), a single-file base checkpoint (LDM UNet keys), a control, or neither."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception:  # unreadable files are not offered; loading them would fail anyway
        return None
    if any("lora" in key.lower() for key in keys):
        return "lora"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return "base"
    return "control" if is_control(path) else None


def scan(folder: Path, depth: int) -> list[tuple[Kind, Path]]:
    """Model folders and files under `folder`, not descending into a model folder."""
    if is_base_folder(folder):
        return [("base", folder)]
    if is_control(folder):
        return [("control", folder)]
    found: list[tuple[Kind, Path]] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and depth > 0 and not child.name.startswith("."):
            found += scan(child, depth - 1)
        elif child.suffix == ".safetensors" and (kind := safetensors_kind(child)):
            found.append((kind, child))
    return found


def check_explicit(kind: Kind, path: str) -> str:
    """A path given on the command line must exist (a base may also be a model id in the local HF cache)."""
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if kind == "base" and "/" in path and not path.startswith((".", "/", "~")):
        return path
    raise ControlNextError(f"{kind} model not found: {path}")


def named_entries(kind: Kind, items: list[tuple[str, str]]) -> list[ModelEntry]:
    """Name entries by their folder or file name; clashes take their parent folder's name too."""
    first_source: dict[str, str] = {}
    for path, source in items:
        first_source.setdefault(path, source)
    unique = list(first_source.items())

    def short(path: str, source: str, parts: int) -> str:
        if source == "embedded":
            return "embedded"
        pieces = Path(path).with_suffix("").parts if Path(path).suffix == ".safetensors" else Path(path).parts
        return "/".join(pieces[-parts:])

    names = [short(p, s, 1) for p, s in unique]
    for parts in (2, 3, 99):
        clashes = {n for n in names if names.count(n) > 1}
        names = [short(p, s, parts) if n in clashes else n for n, (p, s) in zip(names, unique)]
    return [ModelEntry(name, path, kind, source) for name, (path, source) in zip(names, unique)]
