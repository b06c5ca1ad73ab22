"""Output-path safety: no run replaces its input, an arbitrary folder, or another run's output.

Every refusal is exit 2 with one line, before any work, with the inputs byte for byte
unchanged and nothing left beside OUT.
"""

import errno
import hashlib
import os
import subprocess

import pytest

from lyoncompress import output as output_module
from lyoncompress.artifact import _ShardWriter
from lyoncompress.output import claim_output
from tests.helpers import make_mlp_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    folder, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    return folder


def _fingerprint(folder):
    """Every file under ``folder`` (names and contents), to prove nothing changed."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _refused(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in result.output, result.output


def _dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("relation", ["same", "symlink", "inside", "contains"])
@pytest.mark.parametrize("force", [False, True])
def test_factorize_never_writes_into_its_input(tmp_path, ckpt, relation, force, cli):
    before = _fingerprint(tmp_path)
    out = {
        "same": ckpt,
        "symlink": tmp_path / "link",
        "inside": ckpt / "fact",
        "contains": tmp_path,
    }[relation]
    if relation == "symlink":
        out.symlink_to(ckpt)
        before = _fingerprint(tmp_path)
    result = cli("factorize", ckpt, "-o", out, "--method", "lowrank", *(["--force"] if force else []))
    _refused(result, "input")
    assert _fingerprint(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt", *(["link"] if relation == "symlink" else [])]
    )


def test_quantize_never_writes_into_its_input(tmp_path, ckpt, cli):
    fact = tmp_path / "fact"
    assert cli("factorize", ckpt, "-o", fact, "--method", "lowrank").exit_code == 0
    before = _fingerprint(fact)
    _refused(cli("quantize", fact, "-o", fact, "--force"), "input")
    _refused(cli("quantize", fact, "-o", fact / "q", "--force"), "input")
    assert _fingerprint(fact) == before


def test_force_replaces_only_an_artifact(tmp_path, ckpt, cli):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _refused(cli("factorize", ckpt, "-o", folder, "--force"), "not an artifact written by lyoncompress")
    assert (folder / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("factorize", ckpt, "-o", empty, "--force").exit_code == 0  # nothing to lose
    assert (empty / "config.json").exists()
    assert cli("factorize", ckpt, "-o", empty, "--force").exit_code == 0  # an artifact: replaced


def test_dangling_symlink_as_output_is_refused(tmp_path, ckpt, cli):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    _refused(cli("factorize", ckpt, "-o", link), "does not exist")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_symlink_to_an_artifact_with_force_replaces_the_target(tmp_path, ckpt, cli):
    target = tmp_path / "real"
    assert cli("factorize", ckpt, "-o", target, "--method", "lowrank").exit_code == 0
    link = tmp_path / "out"
    link.symlink_to(target)
    assert cli("factorize", ckpt, "-o", link, "--method", "monarch", "--force").exit_code == 0
    assert link.is_symlink() and "monarch" in (target / "report.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "real"]  # no litter


def test_unwritable_folder_is_one_line_before_any_work(tmp_path, ckpt, monkeypatch, cli):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(output_module.os, "symlink", read_only)
    _refused(cli("factorize", ckpt, "-o", tmp_path / "out"), "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_full_disk_during_the_write_is_one_line_and_leaves_nothing(tmp_path, ckpt, monkeypatch, code, cli):
    def full(self, name, tensor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_ShardWriter, "add", full)
    _refused(cli("factorize", ckpt, "-o", tmp_path / "out"), os.strerror(code))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging, no lock


def test_a_second_run_on_the_same_output_fails_fast(tmp_path, ckpt, cli):
    out = tmp_path / "out"
    with claim_output(out, force=False):  # a first run, still working
        _refused(cli("factorize", ckpt, "-o", out), "another lyoncompress run", str(os.getpid()))
        assert not out.exists()
    assert cli("factorize", ckpt, "-o", out).exit_code == 0  # released with the first run


def test_stale_lock_and_scratch_of_dead_runs_are_removed_and_said(tmp_path, ckpt, cli):
    out = tmp_path / "out"
    dead = _dead_pid()
    (tmp_path / ".out.lock").symlink_to(f"{dead}@1")
    for name in (f".out.tmp-{dead}", f".out.stage-{dead}-x1y2", f".out.old-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.tmp-1").mkdir()  # another OUT's: not ours to remove
    result = cli("factorize", ckpt, "-o", out)
    assert result.exit_code == 0, result.output
    assert "removed the lock" in result.output and "3 scratch folder(s)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "ckpt", "out"]


def test_output_with_a_missing_parent_is_refused(tmp_path, ckpt, cli):
    _refused(cli("factorize", ckpt, "-o", tmp_path / "no" / "out"), "parent folder does not exist")


def test_factorize_of_an_artifact_is_refused(tmp_path, ckpt, cli):
    # an artifact's compressed layers have no .weight: factorizing it again would copy their
    # factors through without their records, an artifact that loads nowhere
    assert cli("factorize", ckpt, "-o", tmp_path / "fact", "--method", "lowrank").exit_code == 0
    before = _fingerprint(tmp_path / "fact")
    _refused(cli("factorize", tmp_path / "fact", "-o", tmp_path / "again"), "lyoncompress artifact", "dense")
    assert _fingerprint(tmp_path / "fact") == before
    assert not (tmp_path / "again").exists()
