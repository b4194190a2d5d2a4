"""Docs that cannot rot: every relative link and repository path in README.md and docs/*.md exists, every
`--section.option` they name is a real option of `loop.config`, and no page carries a path outside the repository
or a working note. Pure text checks: fast enough for CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loop.config import option_names

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SECTIONS = ("data", "model", "train", "eval", "augment")
PATH_PREFIXES = ("loop", "scripts", "benchmarks", "tests", "assets", "docs", "accelerate_configs", "examples")
FORBIDDEN = ("../shared", "this session", "been lent")

FENCE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path into the repository: one of the top folders, then path characters. Not preceded by a path character, so
# `/data/cv-corpus` or `runs/x/loop/` are not taken for one; `tests/test_x.py::test_y` stops at the colon.
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*)" % "|".join(PATH_PREFIXES))
# A dotted module of the package or the benchmarks, as `python -m benchmarks.run` or `loop.model.decoding.transcribe`.
MODULE = re.compile(r"(?<![\w./-])((?:loop|benchmarks)(?:\.\w+)+)")
# A test named by its file, as `tests/test_faults.py::test_sigterm_saves_and_resume_finishes`.
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
OPTION = re.compile(r"--(%s)\.([\w.]+)" % "|".join(SECTIONS))
# A code span that is exactly an option, e.g. `model.lora_rank` or `data.pack_to_seconds: 30`.
BARE_OPTION = re.compile(r"^(%s)\.([\w.]+)(?:\s*[:=].*)?$" % "|".join(SECTIONS), re.S)
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "yml", "md", "txt", "sh", "html", "csv", "tsv", "log", "bin", "safetensors", "onnx", "png", "arrow"}  # `train.py`


def code_parts(text: str) -> list[str]:
    """The text of every fenced block and every inline code span."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    return blocks + [m.group(2) for m in INLINE_CODE.finditer(prose)]


def prose_only(text: str) -> str:
    """The text with fenced blocks and inline code removed (a link inside code is not a link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_problems(text: str, page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(prose_only(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor on the same page
        file_part = target.split("#", 1)[0]
        if not (page.parent / file_part).exists():
            problems.append(f"link to {target}: no such file")
    return problems


def module_exists(dotted: str, root: Path) -> bool:
    """`loop.eval.evaluation`, or a name defined in it (`loop.eval.evaluation.transcribe`), exists under `root`."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:cut])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not source.is_file():
            continue
        rest = parts[cut:]
        if not rest:
            return True
        if len(rest) > 1:
            return False
        return re.search(rf"\b{rest[0]}\b", source.read_text(encoding="utf-8")) is not None
    return False


def path_problems(text: str, root: Path) -> list[str]:
    problems = []
    for code in code_parts(text):
        for path in REPO_PATH.findall(code):
            path = path.rstrip(".")
            if not (root / path).exists():
                problems.append(f"path {path}: no such file or folder in the repository")
        for path, name in TEST_REF.findall(code):
            if (root / path).is_file() and not re.search(rf"^\s*def {name}\(", (root / path).read_text(), re.M):
                problems.append(f"test {path}::{name}: no such test")
        for dotted in MODULE.findall(code):
            if not module_exists(dotted.rstrip("."), root):
                problems.append(f"module {dotted}: no such module or name in it")
    return problems


def option_problems(text: str, options: set[str]) -> list[str]:
    named = [f"{s}.{k.rstrip('.')}" for s, k in OPTION.findall(text)]
    for code in code_parts(text):
        if (m := BARE_OPTION.match(code.strip())) and m.group(2) not in FILE_SUFFIXES:
            named.append(f"{m.group(1)}.{m.group(2).rstrip('.')}")
    return [f"option --{name}: not an option of loop.config (see --help)" for name in named if name not in options]


def forbidden_problems(text: str) -> list[str]:
    lowered = text.lower()
    return [f"mentions {word!r}" for word in FORBIDDEN if word in lowered]


def problems(text: str, page: Path, root: Path = ROOT, options: set[str] | None = None) -> list[str]:
    options = set(option_names()) if options is None else options
    found = link_problems(text, page) + path_problems(text, root) + option_problems(text, options)
    return found + forbidden_problems(text)


def test_the_docs_exist():
    names = {p.name for p in PAGES[1:]}
    assert {"README.md", "architecture.md", "data.md", "training.md", "evaluate-and-ship.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_paths_and_options_are_real(page):
    found = problems(page.read_text(encoding="utf-8"), page)
    assert not found, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(found)


def test_every_docs_page_starts_with_an_example():
    """A command comes before the page's first section: a reader can run something before reading on."""
    late = []
    for page in PAGES[1:]:
        if page.name == "README.md":
            continue
        body = page.read_text(encoding="utf-8").split("\n## ", 1)[0]
        if "```" not in body:
            late.append(page.name)
    assert not late, f"pages without a code block before their first '## ' section: {late}"


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES[1:] if p.name != "README.md" and f"({p.name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"


def test_the_checker_finds_each_kind_of_problem(tmp_path):
    """The checks can fail: a page with one fault of each kind gets each named."""
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "real.py").write_text("def known():\n    pass\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_real.py").write_text("def test_there():\n    pass\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    bad = """See [the map](missing.md#layers) and [fine](../loop/real.py), [web](https://example.org), [here](#top).
Run `loop/real.py` and `loop/gone.py`, call `loop.real.known` and `loop.real.unknown` and `loop.nothing`.
Shown by `tests/test_real.py::test_there` and `tests/test_real.py::test_gone`; the loop is in `train.py`.

```bash
python scripts/train.py --config quickstart \\
    --train.max_steps=20 --train.no_such_option=1 \\
    --data.mix='[{name: en, weight: 0.2}]' --model.lora.enabled=true
```

Set `model.lora_rank` or `model.lora_ranks: 8`. Built with ../shared/tools in this session.
"""
    found = problems(bad, page, root=tmp_path,
                     options={"train.max_steps", "data.mix", "model.lora", "model.lora_rank"})
    text = "\n".join(found)
    assert "link to missing.md#layers" in text and "../loop/real.py" not in text and "example.org" not in text
    assert "path loop/gone.py" in text and "path loop/real.py" not in text
    assert "path scripts/train.py" in text  # no scripts/ folder under tmp_path
    assert "test tests/test_real.py::test_gone" in text and "test_there" not in text
    assert "module loop.real.unknown" in text and "module loop.nothing" in text and "loop.real.known" not in text
    assert "--train.no_such_option" in text and "--model.lora.enabled" in text and "--model.lora_ranks" in text
    assert "--train.max_steps" not in text and "--data.mix" not in text and "--model.lora_rank:" not in text
    assert "'../shared'" in text and "'this session'" in text
    assert len(found) == 11, found
