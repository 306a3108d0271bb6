"""YAML attribute catalogs: one file per lesion type (attribute values with weights, organs, size
distribution, HU ranges, constraints).

This module finds catalog files (the catalog path), loads them (validated, cached per file) and
declares their organs to the vocabulary. The model and its seeded, constraint-respecting sampling live
in ``catalog_model``, the parser with line-numbered validation in ``catalog_parse``; their names are
importable from here as before.
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

from .catalog_model import (  # noqa: F401  (re-exported: the catalog's public names live here)
    MAX_SAMPLE_TRIES,
    SAMPLED_ATTRIBUTES,
    Catalog,
    Constraint,
    PlacementSpec,
    SizeSpec,
)
from .catalog_parse import (  # noqa: F401
    ORGAN_KEYS,
    PLACEMENT_KEYS,
    REQUIRED_TOP_KEYS,
    SIZE_KEYS,
    TOP_KEYS,
    parse_catalog,
)
from .errors import CatalogError
from .organs import add_class_name_source
from .report import add_organ_source

log = logging.getLogger(__name__)

CATALOG_PATH_ENV = "LESIONDIFFUSION_CATALOG_PATH"


# ---------------------------------------------------------------------------------------------
# discovery
# folders added by the program (``--catalog-path``, a dataset.json's ``catalog_path``), searched first:
# a user's own catalogs then need no exported environment variable
_EXTRA_DIRS: list[Path] = []


def use_catalog_dirs(paths: Sequence[str | os.PathLike], base: str | os.PathLike | None = None) -> list[Path]:
    """Search ``paths`` (relative ones resolved against ``base``) for catalogs before every other folder,
    for the rest of this process. A folder that does not exist is an error naming it."""
    added = []
    for p in paths:
        d = Path(os.path.expandvars(str(p))).expanduser()
        if base is not None and not d.is_absolute():
            d = Path(base) / d
        if not d.is_dir():
            raise CatalogError(f"Catalog folder {d} does not exist. Fix the --catalog-path option or the dataset.json "
                               "'catalog_path' entry (a folder holding <lesion_type>.yaml files).")
        d = d.resolve()
        if d not in _EXTRA_DIRS:
            _EXTRA_DIRS.insert(len(added), d)
        added.append(d)
    return added


def catalog_dirs() -> list[Path]:
    """Folders searched for catalogs: ``use_catalog_dirs`` folders, ``$LESIONDIFFUSION_CATALOG_PATH``
    entries, then the shipped ones."""
    dirs = list(_EXTRA_DIRS)
    dirs += [Path(p) for p in os.environ.get(CATALOG_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(str(resources.files("lesiondiffusion.attribute_catalogs"))))
    return dirs


def catalog_files() -> dict[str, Path]:
    """Lesion type name -> catalog file (the first folder of ``catalog_dirs()`` that has it wins)."""
    found: dict[str, Path] = {}
    for d in catalog_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            if p.name.startswith("_"):  # templates and drafts
                continue
            found.setdefault(p.stem, p)
    return found


def list_catalogs() -> list[str]:
    """Names of the available catalogs (shipped plus ``$LESIONDIFFUSION_CATALOG_PATH``), sorted."""
    return sorted(catalog_files())


def declare_catalog_organs() -> None:
    """Declare the organs of every loadable catalog on the catalog path (broken files are skipped: their
    errors belong to ``catalogs list``/``validate``)."""
    global _DECLARING
    if _DECLARING:
        return
    _DECLARING = True
    try:
        for path in catalog_files().values():
            try:
                load_catalog(path)
            except CatalogError:
                continue
    finally:
        _DECLARING = False


_DECLARING = False
# a report naming a catalog-declared organ may be read before its catalog: the vocabulary asks this
add_organ_source(declare_catalog_organs)


def catalog_class_names() -> set[str]:
    """Every class name the loadable catalogs on the catalog path list (v2, v1 or `names:`)."""
    names: set[str] = set()
    for path in catalog_files().values():
        try:
            names.update(load_catalog(path).organ_names())
        except CatalogError:
            continue  # a broken catalog's errors belong to `catalogs validate`
    return names


# organ maps naming classes only a catalog lists are not warned about: organs asks this
add_class_name_source(catalog_class_names)


def load_catalog(name_or_path: str | Path) -> Catalog:
    """Load a catalog by name (``kidney_tumor``) or by path to a YAML file; validated, cached per file."""
    p = Path(name_or_path)
    # a bare name is always looked up on the catalog path (a file of that name in the working folder
    # never takes its place); only something spelled as a path is opened as one
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or p.suffix in (".yaml", ".yml") or os.sep in text or "/" in text \
            or (os.altsep and os.altsep in text):
        if not p.exists():
            raise CatalogError(f"Catalog file not found: {p}. Check the path, or run `lesiondiffusion catalogs list`.")
        path = p.resolve()
    else:
        files = catalog_files()
        if str(name_or_path) not in files:
            raise CatalogError(
                f"Unknown lesion type {str(name_or_path)!r}. Available catalogs: {', '.join(sorted(files))}. "
                f"Add a YAML file to a folder in ${CATALOG_PATH_ENV} to define a new type (see attribute_catalogs/_template.yaml)."
            )
        path = files[str(name_or_path)].resolve()
    stat = path.stat()
    return _load_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=128)
def _load_cached(path: str, mtime_ns: int, size: int) -> Catalog:
    return parse_catalog(Path(path))


def validate_catalog_file(path: str | Path) -> None:
    """Raise ``CatalogError`` listing every problem of a catalog file with its line and key."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"Catalog file not found: {path}.")
    parse_catalog(path)
