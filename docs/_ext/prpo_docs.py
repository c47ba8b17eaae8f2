"""Sphinx extension of the prpo-lightning docs: pages generated from the code at build time.

Directives:

``.. config-table:: dotted.path.Class``
    A table of the constructor's arguments (key, type, default, description). Types and defaults come from
    the signature, descriptions from the Google-style ``Args:`` section of the class docstring (or of
    ``__init__``). Option ``:prefix:`` prepends a CLI/YAML path such as ``model.sampling``.

``.. config-components:: dotted.path.BaseClass``
    One subsection per concrete subclass of ``BaseClass`` found in the ``components`` package (or the
    package given by ``:package:``), with its ``class_path``, its summary line and its config table. New
    components appear without editing the docs.

``.. optional-toctree::``
    A toctree of the listed documents that exist (pages owned by other issues that may not be written yet).

``.. api-package:: package``
    One section per (public) module of ``package`` with ``automodule`` of its members, so new modules are
    documented without editing the docs.

Nothing is written to the source tree.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

_SECTION_RE = re.compile(r"^(Args|Arguments|Parameters|Attributes|Returns|Raises|Yields|Example|Examples|Note|Notes|Shapes)\s*:\s*$")
_ARG_RE = re.compile(r"^(?P<names>[A-Za-z_*][\w*]*(?:\s*(?:/|,)\s*[A-Za-z_*][\w*]*)*)\s*(?:\([^)]*\))?\s*:\s*(?P<desc>.*)$")


# ---------------------------------------------------------------------------------------------- introspection
def import_object(path: str) -> Any:
    """Import ``package.module.Name`` (or a module)."""
    try:
        return importlib.import_module(path)
    except ImportError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def parse_google_args(doc: str | None) -> dict[str, str]:
    """Map argument names to their descriptions from a Google-style ``Args:`` section.

    Entries may share a description (``problem_key / answer_key: ...``) and continue on more-indented lines.
    """
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    in_args = False
    entry_indent: int | None = None
    current: list[str] = []
    desc: list[str] = []

    def flush() -> None:
        if current:
            text = " ".join(s.strip() for s in desc if s.strip())
            for name in current:
                out[name] = text

    for line in lines:
        stripped = line.strip()
        m_sec = _SECTION_RE.match(stripped)
        indent = len(line) - len(line.lstrip())
        if m_sec and indent == 0:
            flush()
            current, desc = [], []
            in_args = m_sec.group(1) in ("Args", "Arguments", "Parameters")
            entry_indent = None
            continue
        if not in_args:
            continue
        if not stripped:
            continue
        if indent == 0:  # the section ended (plain paragraph)
            flush()
            current, desc, in_args = [], [], False
            continue
        if entry_indent is None:
            entry_indent = indent
        m_arg = _ARG_RE.match(stripped)
        if indent == entry_indent and m_arg:
            flush()
            current = [n.strip().lstrip("*") for n in re.split(r"[/,]", m_arg.group("names"))]
            desc = [m_arg.group("desc")]
        else:
            desc.append(stripped)
    flush()
    return out


def _format_annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    text = inspect.formatannotation(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _format_default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "*required*"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"``{type(value).__name__}()`` (see below)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"``{text}``"


def attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a class whose fields carry a string literal right under them (LitGPT's style)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            out[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return out


def config_rows(obj: Any) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, description)`` for every named constructor argument of ``obj``."""
    init = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(init)
    except (TypeError, ValueError):
        return []
    try:
        hints = __import__("typing").get_type_hints(init)
    except Exception:  # noqa: BLE001 - unresolvable forward references: fall back to the raw annotations
        hints = {}
    docs = parse_google_args(inspect.getdoc(obj) if inspect.isclass(obj) else None)
    if inspect.isclass(obj) and obj.__init__ is not object.__init__:
        docs = {**parse_google_args(obj.__init__.__doc__), **docs}
    if inspect.isclass(obj):
        docs = {**docs, **attribute_docstrings(obj)}
    rows = []
    for name, p in sig.parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = hints.get(name, p.annotation)
        rows.append((name, _format_annotation(ann), _format_default(p.default), docs.get(name, "")))
    return rows


def _cell(text: str) -> str:
    return text.replace("\n", " ").strip() or "—"


def config_table_rst(obj: Any, prefix: str = "") -> list[str]:
    """reST ``list-table`` lines of :func:`config_rows`."""
    rows = config_rows(obj)
    if not rows:
        return ["*(no arguments)*", ""]
    out = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 22 18 14 46",
        "",
        "   * - Key",
        "     - Type",
        "     - Default",
        "     - Description",
    ]
    for name, ann, default, desc in rows:
        key = f"{prefix}.{name}" if prefix else name
        if not desc:
            logger.info(f"[prpo_docs] {getattr(obj, '__qualname__', obj)}: argument {name!r} has no docstring entry")
        out += [
            f"   * - ``{key}``",
            f"     - ``{ann}``" if ann else "     - —",
            f"     - {_cell(default)}",
            f"     - {_cell(desc) if desc else '*(undocumented)*'}",
        ]
    return out + [""]


def iter_modules(package: str) -> Iterator[ModuleType]:
    """Import ``package`` and every public submodule, in sorted name order."""
    pkg = importlib.import_module(package)
    yield pkg
    if not hasattr(pkg, "__path__"):
        return
    names = sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."))
    for name in names:
        if any(part.startswith("_") for part in name.split(".")):
            continue
        yield importlib.import_module(name)


def public_classes(module: ModuleType) -> list[type]:
    """Classes defined in ``module`` whose names do not start with an underscore."""
    return [
        obj
        for name, obj in sorted(vars(module).items())
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
    ]


def component_classes(base: type, package: str = "components") -> list[type]:
    """Concrete subclasses of ``base`` defined in ``package`` (any depth), ordered by module and name."""
    found: dict[str, type] = {}
    for module in iter_modules(package):
        for cls in public_classes(module):
            if issubclass(cls, base) and cls is not base and not inspect.isabstract(cls):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


def public_path(cls: type, package: str = "components") -> str:
    """The import path to show in YAML: a re-exporting facade module (``components.aligners``) if there is one."""
    facades = [
        m.__name__
        for m in iter_modules(package)
        if getattr(m, cls.__name__, None) is cls and "_" not in m.__name__.rsplit(".", 1)[-1]
    ]
    module = min(facades, key=len) if facades else cls.__module__
    return f"{module}.{cls.__qualname__}"


def summary_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


# ---------------------------------------------------------------------------------------------- directives
class _GeneratedDirective(SphinxDirective):
    has_content = False
    required_arguments = 1

    def parse_generated(self, lines: list[str]) -> list[nodes.Node]:
        source = f"<generated by {self.name} {self.arguments[0]}>"
        content = StringList(lines, source=source)
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, content, node)
        return node.children


class ConfigTableDirective(_GeneratedDirective):
    option_spec = {"prefix": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        obj = import_object(self.arguments[0])
        self.env.note_dependency(inspect.getsourcefile(obj) or "")
        return self.parse_generated(config_table_rst(obj, self.options.get("prefix", "")))


class ConfigComponentsDirective(_GeneratedDirective):
    option_spec = {"prefix": directives.unchanged, "package": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        base = import_object(self.arguments[0])
        prefix = self.options.get("prefix", "")
        classes = component_classes(base, self.options.get("package", "components"))
        if not classes:
            return self.parse_generated([f"*(no {base.__name__} implementation in the components package yet)*", ""])
        lines: list[str] = []
        package = self.options.get("package", "components")
        for cls in sorted(classes, key=lambda c: c.__qualname__):
            path = f"{cls.__module__}.{cls.__qualname__}"
            self.env.note_dependency(inspect.getsourcefile(cls) or "")
            lines += [cls.__qualname__, "~" * len(cls.__qualname__), ""]
            lines += [f"``class_path: {public_path(cls, package)}`` — API: :class:`{path}`", ""]
            summary = summary_line(cls)
            if summary:
                lines += [summary, ""]
            lines += config_table_rst(cls, f"{prefix}.init_args" if prefix else "")
        return self.parse_generated(lines)


class ApiPackageDirective(_GeneratedDirective):
    option_spec = {"exclude": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        exclude = set((self.options.get("exclude") or "").split())
        lines: list[str] = []
        for module in iter_modules(self.arguments[0]):
            name = module.__name__
            if name in exclude:
                continue
            self.env.note_dependency(getattr(module, "__file__", "") or "")
            title = f"``{name}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {name}", "   :members:", "   :show-inheritance:", ""]
        return self.parse_generated(lines)


class OptionalToctreeDirective(SphinxDirective):
    """A toctree of the listed documents that exist (pages other people may or may not have written yet)."""

    has_content = True
    option_spec = {"caption": directives.unchanged, "maxdepth": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        users = getattr(self.env, "prpo_optional_toctree_docs", set())
        users.add(self.env.docname)
        self.env.prpo_optional_toctree_docs = users
        present = [name.strip() for name in self.content if name.strip() in self.env.found_docs]
        if not present:
            return []
        lines = [".. toctree::", f"   :maxdepth: {self.options.get('maxdepth', 1)}"]
        if self.options.get("caption"):
            lines.append(f"   :caption: {self.options['caption']}")
        lines += ["", *(f"   {name}" for name in present), ""]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source="<optional-toctree>"), self.content_offset, node)
        return node.children


_LITERAL_RE = re.compile(r"(``.*?``|`[^`]*`)")


def escape_bars(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Escape ``|`` outside inline literals in docstrings (``1/|o_i|`` is math here, not a reST substitution).

    Lines that look like grid or line-block markup (starting with ``|`` or ``+-``) are left alone.
    """
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if "|" not in line or stripped.startswith(("|", "+-", "+=")):
            continue
        parts = _LITERAL_RE.split(line)
        lines[i] = "".join(p if k % 2 else re.sub(r"(?<!\\)\|", r"\\|", p) for k, p in enumerate(parts))


def reread_optional_toctrees(app: Sphinx, env: Any, added: set[str], changed: set[str], removed: set[str]) -> list[str]:
    """Incremental builds: re-read pages with an ``optional-toctree`` when documents appear or disappear."""
    if not (added or removed):
        return []
    return sorted(getattr(env, "prpo_optional_toctree_docs", set()) - removed)


def merge_optional_toctrees(app: Sphinx, env: Any, docnames: set[str], other: Any) -> None:
    users = getattr(env, "prpo_optional_toctree_docs", set())
    env.prpo_optional_toctree_docs = users | getattr(other, "prpo_optional_toctree_docs", set())


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-get-outdated", reread_optional_toctrees)
    app.connect("env-merge-info", merge_optional_toctrees)
    app.connect("autodoc-process-docstring", escape_bars)
    app.add_directive("optional-toctree", OptionalToctreeDirective)
    app.add_directive("config-table", ConfigTableDirective)
    app.add_directive("config-components", ConfigComponentsDirective)
    app.add_directive("api-package", ApiPackageDirective)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["component_classes", "config_rows", "iter_modules", "parse_google_args", "public_classes", "setup"]
