"""Overlay file names for scanned images: readable, one suffix, and never the same for two inputs.

``good/000.png`` -> ``good/000_heatmap.png``; any other name keeps its suffix in the stem:
``ct/slice.dcm`` -> ``ct/slice.dcm_heatmap.png``, ``ct/1.2.840.5`` -> ``ct/1.2.840.5_heatmap.png``. Only
``N`` and ``N.png`` side by side (or ``N.png`` and ``N.PNG``) would map to the same name; those files
get ``<full name>_overlay.png`` instead, a form no preferred name has.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import PurePosixPath

_PREFERRED = "_heatmap.png"
_FALLBACK = "_overlay.png"


def preferred_overlay_name(relpath: str) -> str:
    """``a/000.png`` -> ``a/000_heatmap.png``; ``a/x.jpg`` -> ``a/x.jpg_heatmap.png``."""
    path = PurePosixPath(relpath)
    base = path.name[: -len(".png")] if path.suffix.lower() == ".png" else path.name
    return str(path.with_name(base + _PREFERRED))


def overlay_names(relpaths: Iterable[str]) -> dict[str, str]:
    """Overlay name (relative, POSIX) of every input path; distinct inputs always get distinct names.

    The rule looks at the folder's listing only to find the rare clashes of preferred names, so a
    file keeps its overlay name across rescans unless a clashing name appears beside it.
    """
    relpaths = list(relpaths)
    preferred = {p: preferred_overlay_name(p) for p in relpaths}
    clashes = Counter(preferred.values())
    return {
        p: name if clashes[name] == 1 else str(PurePosixPath(p).with_name(PurePosixPath(p).name + _FALLBACK))
        for p, name in preferred.items()
    }
