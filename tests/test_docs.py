"""The documentation cannot rot: its snippets run, its commands parse, its names exist.

- Every Python snippet of README.md and docs/*.md runs (Sybil parses the Markdown; the
  snippets of one page share one namespace, in page order, as a reader's session would),
  in a folder of the page's own that holds the sample images the pages name: ``a.jpg``,
  ``b.jpg``, ``photo.jpg`` (Sacre-Coeur photos, longer side 480 px) and ``photos/``
  (three more, 320 px), beside a ``../shared`` that points at the real one. A snippet
  that needs data CI lacks, or runs for minutes, follows a
  ``<!-- skip: next "reason" -->`` comment and is reported skipped with that reason.
- README.md's shell commands run in such a folder (``pip install`` steps excepted: CI has
  installed the package; and the test command itself). The shell commands of docs/*.md
  are parsed with the command line's own parser, so a renamed option fails here.
- ``--help`` of every ``cv2r2d2`` command runs.
- Every name in each module's ``__all__`` exists and is documented (a docstring; for a
  constant, a comment above it or a string below it); every public method of
  ``R2D2Feature`` has a docstring.
- The presets table of docs/presets.md is the package's (``cv2r2d2/presets.py``), the
  README's names every preset, and the architecture page lists the modules of the import
  contract.

Needs the ``docs`` extra (``pip install ".[docs]"``) for the snippets; without it they
skip (in CI they fail).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import pytest

from conftest import IMAGES, IN_CI, ROOT, SHARED, weights_dir

import cv2r2d2

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The sample images the pages name, made from ../shared/images/sacre_coeur.
PHOTOS = ["02928139_3448003521.jpg", "03903474_1471484089.jpg", "10265353_3838484249.jpg",
          "17295357_9106075285.jpg", "32809961_8274055477.jpg"]
PAIR_SIDE = 480
COLLECTION_SIDE = 320
# The command a README line must start with to be this test's own run (not rerun).
TEST_COMMAND = "python -m pytest"


def _sybil_missing() -> Optional[str]:
    try:
        import sybil  # noqa: F401
    except ImportError:
        return "sybil is not installed: pip install '.[docs]'"
    return None


# --- collecting the snippets ------------------------------------------------------------

class Snippet:
    """One fenced code block of a page, with the skip reason of the comment before it."""

    def __init__(self, page: Path, example: Any, language: str, skip: Optional[str]) -> None:
        self.page, self.example, self.language, self.skip = page, example, language, skip

    @property
    def source(self) -> str:
        return str(self.example.parsed)

    def __repr__(self) -> str:
        return f"{self.page.name}:{self.example.line}"


def _skip_reason(arguments: Tuple[str, Optional[str]], where: str) -> str:
    """The reason of ``<!-- skip: next "reason" -->``: a string literal, no expression."""
    action, reason = arguments
    if action != "next" or not reason:
        raise ValueError(f'{where}: only <!-- skip: next "reason" --> is supported, got '
                         f"skip: {action} {reason or ''}")
    value = ast.literal_eval(reason.strip())
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: the skip reason must be a non-empty string, got {reason}")
    return value


def _snippets() -> List[Snippet]:
    if _sybil_missing():
        return []
    from sybil import Document
    from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

    skip_parser = SkipParser()
    parsers = [PythonCodeBlockParser(), CodeBlockParser("bash", evaluator=lambda example: None),
               skip_parser]
    found = []
    for page in PAGES:
        document = Document.parse(str(page), *parsers)
        pending: Optional[str] = None
        for example in document.examples():
            if example.region.evaluator is skip_parser.skipper:
                pending = _skip_reason(example.parsed, f"{page.name}:{example.line}")
                continue
            found.append(Snippet(page, example, example.region.lexemes["arguments"], pending))
            pending = None
    return found


SNIPPETS = _snippets()


# Pages whose Python snippets extract features of the sample photos (10-80 s a snippet on two
# busy cores). A page's snippets share one namespace, so they are marked together.
SLOW_PAGES = {"README.md", "opencv.md", "rotations.md", "getting-started.md", "collections.md"}


def _marked(snippets: List[Snippet]) -> List[Any]:
    """The snippets as test parameters, marked slow where they run the README's commands
    (each the command line in a subprocess, for up to a minute and a half) or are the
    Python snippets of SLOW_PAGES."""
    def slow(snippet: Snippet) -> bool:
        if snippet.skip:
            return False
        if snippet.language == "python":
            return snippet.page.name in SLOW_PAGES
        return snippet.page.name == "README.md" and any(
            _readme_steps(command) for command in _commands(snippet.source))

    return [pytest.param(s, marks=pytest.mark.slow) if slow(s) else s for s in snippets]


# --- the pages' working folders -------------------------------------------------------------

def _resized(path: Path, side: int, target: Path) -> None:
    image = cv2.imread(str(path))
    if image is None:
        pytest.fail(f"cannot read the sample image {path}", pytrace=False)
    scale = side / max(image.shape[:2])
    cv2.imwrite(str(target), cv2.resize(image, None, fx=scale, fy=scale,
                                        interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="session")
def docs_root(tmp_path_factory) -> Path:
    """A folder holding ``shared`` (a link to ../shared) and the sample data, once."""
    weights_dir()
    root = tmp_path_factory.mktemp("docs")
    (root / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    data = root / "data"
    (data / "photos").mkdir(parents=True)
    folder = IMAGES / "sacre_coeur"
    _resized(folder / PHOTOS[0], PAIR_SIDE, data / "a.jpg")
    _resized(folder / PHOTOS[1], PAIR_SIDE, data / "b.jpg")
    shutil.copy(data / "a.jpg", data / "photo.jpg")
    for name in PHOTOS[2:]:
        _resized(folder / name, COLLECTION_SIDE, data / "photos" / name)
    return root


_FOLDERS: Dict[Path, Path] = {}


def page_folder(docs_root: Path, page: Path) -> Path:
    """The page's own working folder (made on its first snippet): the sample data and a
    link to examples/, beside ``shared``."""
    if page not in _FOLDERS:
        folder = docs_root / page.stem
        shutil.copytree(docs_root / "data", folder)
        (folder / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
        _FOLDERS[page] = folder
    return _FOLDERS[page]


def _environment() -> Dict[str, str]:
    env = dict(os.environ, CV2R2D2_WEIGHTS_DIR=str(weights_dir()))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# --- running them -----------------------------------------------------------------------------

def _commands(source: str) -> List[str]:
    """The commands of a shell block: one per line (backslash continuations joined),
    blank and comment-only lines dropped."""
    return [line for line in source.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


def _readme_steps(command: str) -> List[str]:
    """The parts of a README command this test runs: ``a && b`` step by step, without
    ``pip install`` (CI installed the package) and the test command (this run)."""
    steps = []
    for step in command.split("&&"):
        words = shlex.split(step, comments=True)
        program = [w for w in words if "=" not in w or w.startswith("-")]
        if program[:2] == ["pip", "install"] or " ".join(program).startswith(TEST_COMMAND):
            continue
        steps.append(shlex.join(words))
    return steps


def _check_parses(command: str, where: str) -> None:
    """A ``cv2r2d2 ...`` command line parses with the command line's parser."""
    from cv2r2d2.cli import build_parser

    words = shlex.split(command, comments=True)
    if words[:1] != ["cv2r2d2"] or "--help" in words or words[1:2] in (["--version"], ["train"]):
        return
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exit:
        pytest.fail(f"{where}: {command!r} does not parse (exit {exit.code})", pytrace=False)


@pytest.mark.parametrize("snippet", _marked(SNIPPETS), ids=repr)
def test_snippet(snippet: Snippet, docs_root: Path, monkeypatch) -> None:
    if snippet.skip:
        pytest.skip(f"{snippet!r}: {snippet.skip}")
    folder = page_folder(docs_root, snippet.page)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("CV2R2D2_WEIGHTS_DIR", str(weights_dir()))
    if snippet.language == "python":
        snippet.example.evaluate()
        return
    for command in _commands(snippet.source):
        if snippet.page.name != "README.md":
            _check_parses(command, repr(snippet))
            continue
        for step in _readme_steps(command):
            run = subprocess.run(["bash", "-c", step], cwd=folder, env=_environment(),
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{snippet!r}: {step!r} failed:\n{run.stderr[-3000:]}"


def test_snippets_found() -> None:
    reason = _sybil_missing()
    if reason:
        if IN_CI:
            pytest.fail(reason + " (CI installs the docs extra)", pytrace=False)
        pytest.skip(reason)
    pages = {snippet.page.name for snippet in SNIPPETS if snippet.language == "python"}
    assert {"README.md", "opencv.md", "getting-started.md"} <= pages, pages


@pytest.mark.slow  # a subprocess per command (test_cli's help test is quick)
def test_every_command_has_help() -> None:
    from cv2r2d2.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.choices and
                    isinstance(action.choices, dict)).choices
    assert {"extract", "match", "pairs", "sfm", "localize", "presets"} <= set(commands)
    for command in ["", *commands]:
        run = subprocess.run(["cv2r2d2", *command.split(), "--help"], env=_environment(),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.startswith("usage: cv2r2d2"), (command, run.stderr)


# --- public names and their docstrings -------------------------------------------------------

def _modules() -> List[str]:
    names = ["cv2r2d2"]
    for package in ("cv2r2d2", "cv2r2d2.train"):
        path = importlib.import_module(package).__path__
        names += [f"{package}.{info.name}" for info in pkgutil.iter_modules(path)
                  if info.name != "__main__"]
    return names


def _constants(module: Any) -> Tuple[set, set]:
    """The module-level names a module assigns, and those of them with a comment right
    above their assignment or a string literal (an attribute docstring) right below it."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    tree = ast.parse(source)
    assigned, found = set(), set()
    for index, node in enumerate(tree.body):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            assigned.update(names)
            above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            below = tree.body[index + 1] if index + 1 < len(tree.body) else None
            string_below = isinstance(below, ast.Expr) and isinstance(
                getattr(below, "value", None), ast.Constant) and isinstance(below.value.value, str)
            if above.startswith("#") or string_below:
                found.update(names)
    return assigned, found


def _own_docstring(value: Any) -> bool:
    """Whether a class or function has a docstring of its own (not a base class's, nor
    the signature a dataclass puts in place of a missing one)."""
    doc = (vars(value).get("__doc__") if inspect.isclass(value) else value.__doc__) or ""
    if inspect.isclass(value) and doc.startswith(f"{value.__name__}("):
        return False
    return bool(doc.strip())


@pytest.mark.parametrize("name", _modules())
def test_public_names_exist_and_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{name} has no module docstring"
    public = getattr(module, "__all__", None)
    assert public is not None, f"{name} has no __all__"
    constants = None
    undocumented = []
    for attribute in public:
        assert hasattr(module, attribute), f"{name}.__all__ names {attribute!r}, which it lacks"
        value = getattr(module, attribute)
        if inspect.isclass(value) or inspect.isroutine(value):
            if not _own_docstring(value):
                undocumented.append(attribute)
        elif not inspect.ismodule(value):
            if constants is None:
                constants = _constants(module)
            assigned, documented = constants
            # A name imported from another module is documented where it is assigned.
            if attribute in assigned and attribute not in documented:
                undocumented.append(attribute)
    assert not undocumented, f"{name}: no docstring (or comment) for {undocumented}"


def test_r2d2feature_public_methods_are_documented() -> None:
    missing = [name for name, member in vars(cv2r2d2.R2D2Feature).items()
               if not name.startswith("_") and callable(getattr(member, "__func__", member))
               and not (inspect.getdoc(getattr(cv2r2d2.R2D2Feature, name)) or "").strip()]
    assert not missing, missing


# --- tables that must follow the code -----------------------------------------------------------

def _table_rows(text: str, header: str) -> List[List[str]]:
    """The rows of the Markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_presets_tables_follow_the_package() -> None:
    from cv2r2d2.presets import PRESETS

    rows = _table_rows((ROOT / "docs" / "presets.md").read_text(encoding="utf-8"),
                       "| preset | what for | figures |")
    assert [(name.strip("`"), purpose, figures) for name, purpose, figures, _ in rows] == [
        (p.name, p.purpose, p.figures) for p in PRESETS.values()]
    readme = _table_rows((ROOT / "README.md").read_text(encoding="utf-8"), "| preset |")
    assert [row[0].strip("`") for row in readme] == list(PRESETS)


def test_architecture_page_lists_the_contract_modules() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    layers = re.search(r"layers = \[(.*?)\]", text, re.S).group(1)
    contract = set(re.findall(r"cv2r2d2\.(\w+)", layers))
    rows = _table_rows((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"),
                       "| layer | module |")
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row[1])}
    assert listed == contract, (contract - listed, listed - contract)


def test_readme_links_resolve() -> None:
    """The README's relative links (to docs/, CHANGELOG.md, images) name files that exist;
    mkdocs checks the site's own links in strict mode."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local and not [t for t in local if not (ROOT / t).exists()], local
