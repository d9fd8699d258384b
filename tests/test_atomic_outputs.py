"""SIGKILL a writer mid-write: the output holds the previous files or none, never a partial one.

Each test runs a child process (forked from one warmed-up server process per module) that
writes the same output over and over, with every write
slowed down in the middle (half the bytes, a pause, the rest) so that a kill can land inside
it. The child prints ``mid`` inside a write and ``done`` after one; the test kills it either
inside a write or at a random moment, then checks what a user would find. Two children
saving to one directory at once leave one of them's whole checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from conftest import make_spec

import pefc
from pefc.checkpoint import ADAPTERS_FILE, SPEC_FILE, read_checkpoint, save_checkpoint
from pefc.spec import parse_spec

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

TESTS = Path(__file__).resolve().parent
LORA = {"name": "qv", "method": "lora", "target": ["@attn.q"], "r": 2}

PRELUDE = f"""
import sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {str(TESTS)!r})
import torch, pefc
from conftest import make_spec
from pefc.spec import parse_spec

def say(word):
    print(word, flush=True)

def halves(path, data, pause):
    with open(path, "wb") as handle:  # a slow disk: half the bytes, a pause, the rest
        handle.write(data[: len(data) // 2])
        handle.flush()
        say("mid")
        time.sleep(pause)
        handle.write(data[len(data) // 2:])
"""

SLOW_SAFETENSORS = """
import safetensors.torch, pefc.checkpoint
def slow_save_file(tensors, filename, metadata=None):
    halves(filename, safetensors.torch.save(tensors, metadata=metadata), 0.05)
pefc.checkpoint.save_file = slow_save_file
"""


# A warmed-up process (torch, pefc, onnx imported; the test model captured and exported once) that forks
# one writer per round: each round then costs a fork, not a Python start-up, a capture and an export. The writer's stdout is a
# FIFO the test reads; SIGCHLD is ignored there, so killed writers are reaped by the kernel.
FORK_SERVER = PRELUDE + f"""
import json, os, signal
import onnx, pefc.cli, pefc.export
torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children stay safe
_model = pefc.compile(parse_spec(make_spec([{LORA!r}])))  # fills the capture cache the writers hit
_program = []
_torch_export = pefc.export._torch_export
def _exported_once(*args, **kwargs):  # writers re-save one ONNX program, so a kill lands in a save
    if not _program:
        _program.append(_torch_export(*args, **kwargs))
    return _program[0]
pefc.export._torch_export = _exported_once
import tempfile
with tempfile.TemporaryDirectory() as _tmp:
    pefc.export.export_onnx(_model, os.path.join(_tmp, "warm.onnx"))  # exported here, before any fork
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
say("serving")
for request in map(json.loads, sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
        os.dup2(os.open(request["fifo"], os.O_WRONLY), 1)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        try:
            exec(compile(request["code"], "<writer>", "exec"), dict(globals()))
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    say(pid)
"""


class ForkServer:
    """Starts :data:`FORK_SERVER` once; :meth:`spawn` forks a writer running ``code``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "server.log"
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=TESTS.parent, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("ab"))
        assert self.proc.stdout.readline().strip() == "serving", self.log.read_text()[-3000:]
        self.count = 0

    def spawn(self, code: str, log: Path) -> tuple[int, Path]:
        self.count += 1
        fifo = self.workdir / f"writer{self.count}.out"
        os.mkfifo(fifo)
        self.proc.stdin.write(json.dumps({"code": textwrap.dedent(code), "fifo": str(fifo), "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), fifo

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield server
    server.close()


class Writer:
    """A child process that writes an output again and again; the test kills it."""

    def __init__(self, server: ForkServer, code: str, workdir: Path) -> None:
        self.log = workdir / "child.log"
        self.pid, fifo = server.spawn(code, self.log)
        self.stdout = fifo.open()
        self.deadline = time.monotonic() + 120

    def wait_for(self, word: str, count: int = 1) -> None:
        while count:
            line = self.stdout.readline()
            assert line, f"the writer exited early:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < self.deadline, "the writer is too slow"
            count -= line.strip() == word

    def kill(self, delay: float = 0.0) -> None:
        time.sleep(delay)
        os.kill(self.pid, signal.SIGKILL)
        self.finish()

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def finish(self) -> list[str]:
        """The writer's remaining output, once it has exited (its end of the FIFO closes when it dies)."""
        rest = self.stdout.read().split()
        self.stdout.close()
        while self.alive():
            assert time.monotonic() < self.deadline, f"writer {self.pid} did not exit"
            time.sleep(0.01)
        return rest


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def assert_checkpoint_whole(directory: Path, *, versioned: bool = True) -> int | None:
    """The checkpoint in ``directory`` is absent or complete; returns the version every tensor holds."""
    if not directory.exists():
        return None
    assert set(visible(directory)) <= {ADAPTERS_FILE, SPEC_FILE}, visible(directory)
    if SPEC_FILE in visible(directory):
        parse_spec(json.loads((directory / SPEC_FILE).read_text()))
    if ADAPTERS_FILE not in visible(directory):
        return None
    assert SPEC_FILE in visible(directory)  # spec.json is written first
    tensors, _ = read_checkpoint(directory)  # parses, digests match
    if not versioned:
        return 0
    values = {float(v.flatten()[0]) for v in tensors.values()} | {float(v.min()) for v in tensors.values()}
    assert len(values) == 1, f"tensors from several versions: {values}"
    return int(values.pop())


# kill inside a write / at a random moment; the later rounds overwrite the files of the earlier ones
ROUNDS = [("mid", 1), ("random", 0), ("mid", 3)]


def test_killed_save_adapters_leaves_previous_checkpoint_or_none(tmp_path, fork_server):
    out = tmp_path / "ckpt"
    code = SLOW_SAFETENSORS + f"""
model = pefc.compile(parse_spec(make_spec([{LORA!r}])))
say("ready")
version = 0
while True:
    version += 1
    with torch.no_grad():
        for tensor in model.adapter_state_dict().values():
            tensor.fill_(version)
    model.save_adapters({str(out)!r})
    say("done")
"""
    rng = random.Random(1)
    versions, temporaries = [], []
    for how, count in ROUNDS:
        writer = Writer(fork_server, code, tmp_path)
        writer.wait_for("ready")
        if how == "mid":
            writer.wait_for("mid", count)
            writer.kill()
        else:
            writer.kill(rng.uniform(0.05, 0.4))
        versions.append(assert_checkpoint_whole(out))
        temporaries += hidden(out) if out.exists() else []
    assert any(name.startswith(f".{ADAPTERS_FILE}.") for name in temporaries)  # some kills hit a write
    _next_save_removes_stale_temporaries(out)


def _next_save_removes_stale_temporaries(out: Path) -> None:
    tensors, spec = read_checkpoint(out)
    save_checkpoint(out, tensors, json.dumps(spec))
    assert hidden(out) == [] and visible(out) == [ADAPTERS_FILE, SPEC_FILE]


def test_killed_cli_compile_leaves_previous_checkpoint_or_none(tmp_path, fork_server):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(make_spec([LORA])))
    out = tmp_path / "out"
    code = SLOW_SAFETENSORS + f"""
from pefc.cli import main
say("ready")
while True:
    assert main(["compile", {str(spec)!r}, "-o", {str(out)!r}]) == 0
    say("done")
"""
    rng = random.Random(2)
    for how, count in ROUNDS:
        writer = Writer(fork_server, code, tmp_path)
        writer.wait_for("ready")
        if how == "mid":
            writer.wait_for("mid", count)
            writer.kill()
        else:
            writer.wait_for("done")
            writer.kill(rng.uniform(0.0, 0.5))
        assert_checkpoint_whole(out, versioned=False)
        if how == "random":
            assert visible(out) == [ADAPTERS_FILE, SPEC_FILE]  # a complete save happened before the kill
    _next_save_removes_stale_temporaries(out)


def test_killed_export_leaves_previous_model_or_none(tmp_path, fork_server):
    out = tmp_path / "onnx" / "model.onnx"
    code = f"""
from pefc.export import export_onnx
original = torch.onnx.ONNXProgram.save
def slow_save(self, destination, **options):
    original(self, destination, **options)
    with open(destination, "rb") as handle:
        data = handle.read()
    halves(destination, data, 0.2)
torch.onnx.ONNXProgram.save = slow_save
model = pefc.compile(parse_spec(make_spec([{LORA!r}])))
say("ready")
while True:
    export_onnx(model, {str(out)!r})
    say("done")
"""
    rng = random.Random(3)
    temporaries = []
    for how, count in [("random", 0), ("mid", 1)]:  # the second finds the first's model.onnx in place
        writer = Writer(fork_server, code, tmp_path)
        writer.wait_for("ready")
        if how == "random":
            writer.wait_for("done")
            writer.kill(rng.uniform(0.0, 1.5))
        else:
            writer.wait_for("mid", count)
            writer.kill()
        assert set(visible(out.parent)) <= {"model.onnx"}
        if out.exists():
            onnx.checker.check_model(onnx.load(str(out)))
        temporaries += hidden(out.parent)
    assert any(name.startswith(".model.onnx.") for name in temporaries)
    _later_export_works_and_cleans_up(out, fork_server, tmp_path)


def _later_export_works_and_cleans_up(out: Path, server: ForkServer, workdir: Path) -> None:
    """A later export (a fresh writer of the server, through the real save path) removes the stale temporaries."""
    writer = Writer(server, f"""
from pefc.export import export_onnx
export_onnx(pefc.compile(parse_spec(make_spec([{LORA!r}]))), {str(out)!r})
say("exported")
""", workdir)
    assert writer.finish() == ["exported"], writer.log.read_text()[-3000:]
    assert hidden(out.parent) == [] and visible(out.parent) == ["model.onnx"]
    onnx.checker.check_model(onnx.load(str(out)))


def test_stale_temporaries_of_live_writers_are_kept(tmp_path):
    """Only entries of dead processes on this host are removed: a live writer's file is never touched."""
    from pefc.atomic import _HOST, remove_stale_temporaries

    target = tmp_path / ADAPTERS_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        names = {f".{ADAPTERS_FILE}.{sleeper.pid}@{_HOST}.a.tmp": True, f".{ADAPTERS_FILE}.{dead}@{_HOST}.b.tmp": False,
                 f".{ADAPTERS_FILE}.{dead}@otherhost.c.tmp": True, f".{ADAPTERS_FILE}.{os.getpid()}@{_HOST}.d.tmp": True,
                 f".other.{dead}@{_HOST}.e.tmp": True}
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temporaries(target)
        assert [p.name for p in removed] == [n for n, kept in names.items() if not kept]
        assert sorted(hidden(tmp_path)) == sorted(n for n, kept in names.items() if kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_concurrent_reader_never_sees_a_partial_checkpoint(tmp_path, fork_server):
    """While a child saves over and over, every read in this process finds a whole checkpoint."""
    out = tmp_path / "ckpt"
    code = SLOW_SAFETENSORS.replace("0.05", "0.002") + f"""
model = pefc.compile(parse_spec(make_spec([{LORA!r}])))
say("ready")
for version in range(1, 41):
    with torch.no_grad():
        for tensor in model.adapter_state_dict().values():
            tensor.fill_(version)
    model.save_adapters({str(out)!r})
say("finished")
"""
    writer = Writer(fork_server, code, tmp_path)
    writer.wait_for("ready")
    seen = set()
    while writer.alive():
        version = assert_checkpoint_whole(out)
        if version is not None:
            seen.add(version)
    assert writer.finish()[-1:] == ["finished"], writer.log.read_text()[-3000:]
    assert assert_checkpoint_whole(out) == 40 and len(seen) > 3
    assert torch.equal(read_checkpoint(out)[0]["qv.model.layers.0.self_attn.q_proj.lora_B"],
                       torch.full((32, 2), 40.0))


class _FakeProgram:
    """Saves like an ONNXProgram with external data: MODEL and MODEL.data."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def save(self, destination: str, external_data: bool) -> None:
        Path(destination).write_text(f"model {self.tag}")
        Path(destination + ".data").write_text(f"data {self.tag}")


def test_export_with_external_data_never_pairs_the_previous_model_with_new_data(tmp_path, monkeypatch):
    from pefc import export

    path = tmp_path / "model.onnx"
    export._atomic_save(_FakeProgram("old"), path, True)
    replace = os.replace

    def crash_before_the_model_lands(source, target):
        if Path(target) == path:
            raise OSError("killed")
        replace(source, target)

    monkeypatch.setattr(export.os, "replace", crash_before_the_model_lands)
    with pytest.raises(OSError, match="killed"):
        export._atomic_save(_FakeProgram("new"), path, True)
    assert not path.exists()  # no model rather than the old model with the new data
    monkeypatch.setattr(export.os, "replace", replace)
    export._atomic_save(_FakeProgram("new"), path, True)
    assert visible(tmp_path) == ["model.onnx", "model.onnx.data"] and hidden(tmp_path) == []
    assert {p.read_text() for p in tmp_path.iterdir()} == {"model new", "data new"}


SAVES = 100


def test_two_processes_saving_to_one_directory_leave_one_whole_checkpoint(tmp_path, fork_server):
    """Writer A saves alpha 4 with tensors +k, writer B alpha 16 with -k, 100 times each, at once.

    Saves take turns under a lock on the directory, so the result is one writer's last save,
    and spec.json is that same writer's spec (loading reads only adapters.safetensors anyway).
    """
    out, go = tmp_path / "ckpt", tmp_path / "go"
    alphas = {1: 4, -1: 16}
    writers = []
    for sign, alpha in alphas.items():
        code = f"""
import os
model = pefc.compile(parse_spec(make_spec([{ {**LORA, "alpha": alpha}!r}])))
say("ready")
while not os.path.exists({str(go)!r}):  # start together, so the saves overlap
    time.sleep(0.01)
for step in range(1, {SAVES} + 1):
    with torch.no_grad():
        for tensor in model.adapter_state_dict().values():
            tensor.fill_({sign} * step)
    model.save_adapters({str(out)!r})
say("finished")
"""
        (tmp_path / f"writer{sign}").mkdir()
        writers.append(Writer(fork_server, code, tmp_path / f"writer{sign}"))
    for writer in writers:
        writer.wait_for("ready")
    go.touch()
    for writer in writers:
        assert writer.finish() == ["finished"], writer.log.read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [ADAPTERS_FILE, SPEC_FILE]
    tensors, embedded = read_checkpoint(out)
    values = {float(v) for t in tensors.values() for v in t.unique()}
    assert values in ({SAVES}, {-SAVES})  # one writer's last save, whole
    sign = 1 if values == {SAVES} else -1
    assert embedded["adapters"][0]["alpha"] == alphas[sign]
    assert json.loads((out / SPEC_FILE).read_text()) == embedded  # the pair is consistent
    model = pefc.compile(parse_spec(make_spec([{**LORA, "alpha": alphas[sign]}])))
    model.load_adapters(out)
    assert all(torch.equal(t, torch.full_like(t, SAVES * sign)) for t in model.adapter_state_dict().values())
