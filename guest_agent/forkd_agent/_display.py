"""Rich results for eval kernels, following IPython's display conventions.

Runs inside a kernel process. An object may offer ``_repr_mimebundle_`` and any
of the ``_repr_<format>_`` methods; every format it offers becomes a field of
the result dict, binary ones (png, jpeg, pdf) base64-encoded as a notebook
carries them. ``text`` (repr) is always there.

matplotlib and pandas are recognised only when the user's code has already
imported them (looked up in sys.modules): importing them here would cost a
fraction of a second in every kernel that never plots.
"""

from __future__ import annotations

import binascii
import io
import sys
from typing import Any

import msgpack

from forkd import protocol as p

__all__ = [
    "RESULT_KEYS",
    "format_result",
    "from_bundle",
    "text_of",
    "plain_value",
    "is_figure",
    "open_figures",
    "close_figure",
    "watch_pyplot",
]

RESULT_KEYS = (*p.RESULT_FORMATS, "is_main_result", "extra")

_MIME_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "text/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}
_REPR_METHODS = (
    ("_repr_html_", "html"),
    ("_repr_markdown_", "markdown"),
    ("_repr_svg_", "svg"),
    ("_repr_png_", "png"),
    ("_repr_jpeg_", "jpeg"),
    ("_repr_pdf_", "pdf"),
    ("_repr_latex_", "latex"),
    ("_repr_json_", "json"),
    ("_repr_javascript_", "javascript"),
)
_BINARY = frozenset(("png", "jpeg", "pdf"))
_STRUCTURED = frozenset(("json", "data", "chart"))

# A result travels in one protocol frame (4 MiB at most), so it is kept well under that.
TEXT_LIMIT = 1024 * 1024
FIELD_LIMIT = 2 * 1024 * 1024
RESULT_LIMIT = 3 * 1024 * 1024
# code.eval's value is meant for small plain data; anything bigger is only text.
VALUE_LIMIT = 64 * 1024
# A DataFrame's cells are copied into ``data`` only up to this many.
DATA_CELLS_LIMIT = 10_000


def text_of(obj: Any) -> str:
    return _clip_text(repr(obj))


def format_result(obj: Any) -> dict:
    """The result dict of one displayed object (is_main_result left False)."""
    out: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    out["is_main_result"] = False
    extra: dict[str, Any] = {}
    bundle = _call(obj, "_repr_mimebundle_")
    if isinstance(bundle, tuple):  # (data, metadata)
        bundle = bundle[0] if bundle else None
    if isinstance(bundle, dict):
        _merge_bundle(out, extra, bundle)
    for name, key in _REPR_METHODS:
        if out[key] is None:
            value = _call(obj, name)
            if isinstance(value, tuple):  # (data, metadata), as IPython allows
                value = value[0] if value else None
            if value is not None:
                out[key] = _field(key, value)
    if out["png"] is None and is_figure(obj):
        out["png"] = _figure_png(obj)
    if out["data"] is None:
        out["data"] = _dataframe_data(obj)
    if out["text"] is None:
        out["text"] = text_of(obj)
    out["extra"] = extra or None
    return _fit(out)


def from_bundle(bundle: dict) -> dict:
    """A result from a raw mime bundle (``display(bundle, raw=True)``)."""
    out: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    out["is_main_result"] = False
    extra: dict[str, Any] = {}
    _merge_bundle(out, extra, bundle)
    out["extra"] = extra or None
    return _fit(out)


def plain_value(value: Any) -> Any:
    """``value`` when it is small plain data msgpack carries as is, else None."""
    try:
        packed = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_plain_container)
    except Exception:  # TypeError, OverflowError, ValueError (nesting) ...
        return None
    return value if len(packed) <= VALUE_LIMIT else None


def _plain_container(obj: Any) -> Any:
    # strict_types refuses subclasses (numpy.float64 is a float, IntEnum an int):
    # those are not plain data. Tuples and dict subclasses are, as lists and maps.
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    raise TypeError(type(obj).__name__)


# -- formats ------------------------------------------------------------------


def _merge_bundle(out: dict, extra: dict, bundle: dict) -> None:
    for mime, value in bundle.items():
        if value is None:
            continue
        key = _MIME_KEYS.get(mime)
        if key is None:
            extra[str(mime)] = _jsonable(value)
        elif out[key] is None:
            out[key] = _field(key, value)


def _field(key: str, value: Any) -> Any:
    if key == "text":
        return _clip_text(value if isinstance(value, str) else str(value))
    if key in _BINARY:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return binascii.b2a_base64(bytes(value), newline=False).decode("ascii")
        return str(value)  # already base64, as a mime bundle carries it
    if key in _STRUCTURED:
        return _jsonable(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _call(obj: Any, name: str) -> Any:
    """``obj.<name>()`` if its class defines it; a failing repr method is reported
    on stderr and skipped, as IPython does, so the cell still succeeds."""
    if isinstance(obj, type):  # a class as value: its _repr_*_ are unbound
        return None
    if getattr(type(obj), name, None) is None:
        return None
    try:
        method = getattr(obj, name)
        return method() if name != "_repr_mimebundle_" else method(include=None, exclude=None)
    except Exception as exc:
        print(f"{type(obj).__name__}.{name}() failed: {exc!r}", file=sys.stderr)
        return None


def _jsonable(value: Any) -> Any:
    """JSON-shaped plain data (what a notebook would carry) for json/data fields."""
    import json

    try:
        if isinstance(value, (str, bytes)):
            return json.loads(value)
        return json.loads(json.dumps(value, default=str))
    except Exception:
        return str(value)


def _clip_text(text: str) -> str:
    if len(text) <= TEXT_LIMIT // 4:
        return text
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= TEXT_LIMIT:
        return text
    kept = raw[:TEXT_LIMIT].decode("utf-8", "ignore")
    return f"{kept}\n... [{len(text) - len(kept)} more characters not shown]"


def _size(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "backslashreplace"))
    try:
        return len(msgpack.packb(value, use_bin_type=True, default=str))
    except Exception:
        return RESULT_LIMIT + 1


def _fit(out: dict) -> dict:
    """Drop formats (largest first, never text) until the result fits one frame;
    the dropped ones are named in extra["omitted_formats"]."""
    sizes = {k: _size(v) for k, v in out.items() if k not in ("text", "is_main_result") and v is not None}
    omitted = [k for k, n in sizes.items() if n > FIELD_LIMIT]
    total = _size(out["text"]) + sum(n for k, n in sizes.items() if k not in omitted)
    for key in sorted(sizes, key=sizes.get, reverse=True):
        if total <= RESULT_LIMIT:
            break
        if key not in omitted:
            omitted.append(key)
            total -= sizes[key]
    if omitted:
        for key in omitted:
            out[key] = None
        out["extra"] = {**(out["extra"] or {}), "omitted_formats": omitted}
    return out


# -- pandas -------------------------------------------------------------------


def _dataframe_data(obj: Any) -> dict | None:
    """Columns as lists, as E2B's code interpreter gives a DataFrame's ``data``."""
    pandas = sys.modules.get("pandas")
    frame_type = getattr(pandas, "DataFrame", None) if pandas is not None else None
    if frame_type is None or not isinstance(obj, frame_type):
        return None
    try:
        if obj.size > DATA_CELLS_LIMIT:
            return None
        columns = obj.to_dict(orient="list")
        return {str(name): [_plain_cell(v) for v in values] for name, values in columns.items()}
    except Exception:
        return None


def _plain_cell(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str, float)):
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**64 else str(v)
    item = getattr(v, "item", None)  # numpy scalars
    if item is not None and type(v).__module__ == "numpy":
        try:
            return _plain_cell(item())
        except Exception:
            return str(v)
    isoformat = getattr(v, "isoformat", None)  # datetime, pandas Timestamp
    if isoformat is not None:
        try:
            return isoformat()
        except Exception:
            return str(v)
    return str(v)


# -- matplotlib ---------------------------------------------------------------


def is_figure(obj: Any) -> bool:
    figure_module = sys.modules.get("matplotlib.figure")
    figure_type = getattr(figure_module, "Figure", None) if figure_module is not None else None
    return figure_type is not None and isinstance(obj, figure_type)


def _figure_png(fig: Any) -> str | None:
    buf = io.BytesIO()
    try:
        # bbox_inches="tight" is what a notebook's inline backend uses.
        fig.savefig(buf, format="png", bbox_inches="tight")
    except Exception as exc:
        print(f"cannot render the figure: {exc!r}", file=sys.stderr)
        return None
    return binascii.b2a_base64(buf.getvalue(), newline=False).decode("ascii")


def open_figures() -> list:
    """Figures pyplot still holds open, in creation order."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    return [pyplot.figure(num) for num in pyplot.get_fignums()]


def close_figure(fig: Any) -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def watch_pyplot(show) -> None:
    """Make ``pyplot.show()`` call ``show()`` (display and close the open figures,
    as a notebook's inline backend does) once the user's code imports pyplot.

    With the Agg backend show() does nothing, so a cell that plots, shows, and
    plots again would otherwise draw both plots on one figure.
    """
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        _patch_show(pyplot, show)
        return
    sys.meta_path.insert(0, _PyplotFinder(show))


def _patch_show(pyplot: Any, show) -> None:
    def inline_show(*args: Any, **kwargs: Any) -> None:
        show()

    inline_show.__doc__ = pyplot.show.__doc__
    pyplot.show = inline_show


class _PyplotFinder:
    """Import hook: lets the real finders locate matplotlib.pyplot, then patches
    the module right after it has executed."""

    def __init__(self, show) -> None:
        self.show = show

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "matplotlib.pyplot":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self)
        return spec


class _PatchingLoader:
    def __init__(self, loader: Any, finder: _PyplotFinder) -> None:
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # The module must look as if the real loader had loaded it.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _patch_show(module, self._finder.show)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
