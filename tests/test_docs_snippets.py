"""Every snippet in README.md and docs/*.md runs, so a claim that stops being true fails here.

Per document, in a temporary working directory holding the repository's ``specs/`` and
``examples/``, in document order: ```python blocks run in one namespace (like doctest; a
``test_*`` function a block defines is then called, as pytest would); ```bash / ```console /
```sh lines run through the real CLI (``pefc ...`` in-process, ``python ...`` and
``torchrun ...`` as subprocesses); ```yaml blocks are validated as specs. A block that needs
hardware absent here is preceded by ``<!-- not run: REASON -->`` with REASON from
``NOT_RUN_REASONS``; a block another test runs (and checks more closely) by
``<!-- run by tests/FILE.py -->``, where FILE calls :func:`blocks_run_by`; every other block
must run. A python block that calls
``init_distributed`` runs as under ``torchrun --nproc_per_node=1`` (torchrun's environment
for one process; the process group is torn down after the document).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import pefc
from pefc import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN_REASONS = ("needs CUDA", "needs CUDA and 8 processes")
SHELL = {"bash", "console", "sh"}
SNIPPETS = {"python", "yaml", *SHELL}
FRAGMENT_BASE = "specs/llama-lora.yaml"  # what a YAML fragment (no `version`) is merged over
MARKER = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
RUN_BY = re.compile(r"<!--\s*run by (tests/[\w/]+\.py)\s*-->")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None
    run_by: str | None = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced snippet blocks of ``doc`` (languages in ``SNIPPETS``), with their not-run markers."""
    lines, found, i = doc.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{doc.name}:{i + 1}: unterminated code fence"
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker, run_by = MARKER.fullmatch(before.strip()), RUN_BY.fullmatch(before.strip())
        if fence.group(1) in SNIPPETS:
            found.append(Block(doc, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                               marker.group(1) if marker else None, run_by.group(1) if run_by else None))
        else:
            assert not marker and not run_by, f"{doc.name}:{i + 1}: a marker before a {fence.group(1) or 'plain'} block"
        i = end + 1
    return found


def blocks_run_by(test_file: str) -> list[Block]:
    """The blocks of every document marked ``<!-- run by TEST_FILE -->`` (``tests/...py``), for that file to run."""
    return [b for doc in DOCS for b in blocks(doc) if b.run_by == test_file]


def ci_command() -> str:
    """The command `.ci/run` runs (its last line)."""
    return (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]


# --- shell ---------------------------------------------------------------------------------

def is_setup(line: str) -> bool:
    """A set-up line (venv + pip install): checked against `.ci/run` and pyproject, never run here."""
    return "pip install" in line


def project_extras() -> set[str]:
    """The extras pyproject.toml defines (tomllib is not in Python 3.10)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def check_setup(line: str, block: Block) -> None:
    steps = [s.strip() for s in line.split("&&")]
    extras = project_extras()
    for step in steps:
        for wanted in re.findall(r'-e "?\.\[([\w,]+)\]"?', step):
            assert set(wanted.split(",")) <= extras, f"{block.where}: unknown extras {wanted}"
    if "pytest" in steps[-1]:
        assert line == ci_command(), f"{block.where}: the test command differs from .ci/run's"
    else:
        assert steps[-1] == "pefc demo", f"{block.where}: the set-up command ends with {steps[-1]!r}"
        assert " && ".join(steps[:-1]) in ci_command().replace('".[dev]"', '".[hf]"'), block.where
        # the demo itself: tests/test_demo.py


def run_shell(block: Block, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for line in block.text.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if is_setup(line):
            check_setup(line.split("#")[0].strip(), block)
        elif argv[:3] == ["python", "-m", "pytest"]:  # the suite itself: the same command CI runs
            assert ci_command().endswith(" && " + " ".join(argv)), f"{block.where}: {line}"
        elif argv[0] == "pefc":
            code = cli.main(argv[1:])
            assert code == 0, f"{block.where}: `{line}` exited {code}:\n{capsys.readouterr().err}"
        elif argv[0] in ("python", "torchrun", "ruff"):
            run_process(argv, block, workdir)
        else:
            pytest.fail(f"{block.where}: no runner for `{line}`")


def run_process(argv: list[str], block: Block, workdir: Path) -> None:
    runner = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"],
              "ruff": [sys.executable, "-m", "ruff"]}[argv[0]]
    cwd = ROOT if argv[0] == "ruff" else workdir  # `ruff check .` checks the repository
    result = subprocess.run([*runner, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{block.where}: `{shlex.join(argv)}` exited {result.returncode}:\n" \
                                   f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


# --- yaml ----------------------------------------------------------------------------------

def overlay(base: Any, part: Any, where: str) -> Any:
    """``part`` over ``base``: mappings merge key by key; a ``...`` key keeps the rest of ``base``."""
    if not isinstance(part, dict):
        return part
    elided = part.pop("...", "absent") is None
    assert isinstance(base, dict) or not elided, f"{where}: `...` where the base has no mapping"
    merged = copy.deepcopy(base) if elided else {}
    for key, value in part.items():
        merged[key] = overlay((base or {}).get(key) if isinstance(base, dict) else None, value, where)
    return merged


def check_yaml(block: Block) -> None:
    """A whole spec validates; ``# specs/X.yaml`` on its first line: it is that file (``...`` elides);
    a fragment (no ``version``) validates merged over ``FRAGMENT_BASE``."""
    data = yaml.safe_load(block.text)
    named = re.match(r"#\s*(specs/\S+\.ya?ml)\s*$", block.text.splitlines()[0])
    if named:
        file_data = yaml.safe_load((ROOT / named.group(1)).read_text())
        assert overlay(file_data, copy.deepcopy(data), block.where) == file_data, \
            f"{block.where}: differs from {named.group(1)}"
        data = file_data
    elif "version" not in data:
        data = overlay(yaml.safe_load((ROOT / FRAGMENT_BASE).read_text()), {**data, "...": None}, block.where)
    pefc.parse_spec(data, source=block.where)


# --- python --------------------------------------------------------------------------------

@contextlib.contextmanager
def torchrun_env(block: Block, monkeypatch: pytest.MonkeyPatch):
    """torchrun's environment for one process while a block that calls ``init_distributed`` runs."""
    if "init_distributed(" not in block.text:
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield


def run_python(block: Block, namespace: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = set(namespace)
    with torchrun_env(block, monkeypatch):
        exec(compile(block.text, block.where, "exec"), namespace)
    for name in sorted(set(namespace) - before):
        if name.startswith("test_") and callable(namespace[name]):
            params = inspect.signature(namespace[name]).parameters
            namespace[name](**({"tmp_path": tmp_path / name} if "tmp_path" in params else {}))


# --- the tests -----------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with the repository's specs/ and examples/."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("specs", "examples"):
        (work / name).symlink_to(ROOT / name)
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_snippet_of_the_document_runs(doc: Path, workdir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    namespace: dict[str, Any] = {"__name__": f"docs:{doc.name}"}
    ran, skipped = [], []
    try:
        for block in blocks(doc):
            if block.run_by:
                source = (ROOT / block.run_by).read_text() if (ROOT / block.run_by).is_file() else ""
                assert f'blocks_run_by("{block.run_by}")' in source, f"{block.where}: {block.run_by} does not run it"
                skipped.append(block.where)
                continue
            if block.not_run:
                assert block.not_run in NOT_RUN_REASONS, f"{block.where}: unknown reason {block.not_run!r}"
                skipped.append(block.where)
                continue
            if block.lang == "python":
                run_python(block, namespace, monkeypatch, tmp_path)
            elif block.lang == "yaml":
                check_yaml(block)
            else:
                run_shell(block, workdir, capsys)
            ran.append(block.where)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    assert len(ran) + len(skipped) == len(blocks(doc))


def test_the_docs_have_snippets_and_the_unrun_ones_say_why():
    every = [b for doc in DOCS for b in blocks(doc)]
    readme = [b for b in every if b.doc.name == "README.md"]
    assert sum(b.lang == "python" for b in readme) >= 8 and sum(b.lang in SHELL for b in readme) >= 5
    assert all(b.not_run in NOT_RUN_REASONS for b in every if b.not_run)
    assert sum(bool(b.not_run) for b in every) <= 2  # only what needs hardware absent here
    first, second = readme[0], readme[1]
    assert first.text.strip().endswith("&& pefc demo")
    assert second.text.strip() == ci_command()


def test_the_vera_example_is_as_long_as_the_docs_say():
    lines = sum(len(f.read_text().splitlines()) for f in (ROOT / "examples/plugins/pefc-vera/pefc_vera").glob("*.py"))
    claims = [int(n) for doc in DOCS for n in re.findall(r"VeRA in\s+(?:one\s+)?(\d+)[-\s]line", doc.read_text())]
    assert len(claims) >= 2 and set(claims) == {lines}
