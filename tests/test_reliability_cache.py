"""Faults of the view cache (issue 15): damaged views, a full disk, concurrent runs, a view read as
another architecture, a read-only cache. Each test injects the fault, asserts the one-line message
(and the exit code through the CLI) and that nothing already cached is lost."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from oodens.api import OodensWarning
from oodens.data import get_benchmark
from oodens.errors import OodensError
from oodens.modes.discovery import discover_modes
from oodens.views.cache import FORMAT_VERSION, ViewCache, ViewWriter
from oodens.views.extract import extract, model_identity

from conftest import snapshot
from cli_runner import messages, run


def _sources():
    b = get_benchmark("digits")
    return [b.id_test, b.ood["letters"]]


def _view_folder(cache_root: Path, mode: str, dataset: str) -> Path:
    """The base view folder of ``mode`` on ``dataset`` (found through its meta.json)."""
    for meta in (cache_root / "views" / f"v{FORMAT_VERSION}").rglob("meta.json"):
        m = json.loads(meta.read_text())
        if m["mode"] == mode and m["dataset"]["name"] == dataset and m["view"]["kind"] == "base":
            return meta.parent
    raise AssertionError(f"no view of {mode} on {dataset}")


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-17] ^= 0x40  # a bit of the last rows' data, well past the npy header
    f.write_bytes(bytes(data))


def _truncate(f: Path, size=None) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2 if size is None else size)


def _bad_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[:6] = b"XXXXXX"
    f.write_bytes(bytes(data))


DAMAGES = {
    # name: (what is done to the folder, the file named, the reason in the message)
    "bit-flip": (lambda d: _flip(d / "logits.npy"), "logits.npy", r"damaged \(checksum mismatch\)"),
    "truncated": (lambda d: _truncate(d / "logits.npy"), "logits.npy", r"damaged \(truncated: \d+ bytes"),
    "empty": (lambda d: _truncate(d / "features.npy", 0), "features.npy", r"damaged \(bad npy header"),
    "bad-header": (lambda d: _bad_header(d / "labels.npy"), "labels.npy", r"damaged \(bad npy header"),
    "missing-array": (lambda d: (d / "logits.npy").unlink(), "logits.npy", r"damaged \(file missing\)"),
    "missing-meta": (lambda d: (d / "meta.json").unlink(), "meta.json", r"incomplete \(no meta.json"),
    "bad-meta": (lambda d: (d / "meta.json").write_text("{\"arr"), "meta.json", r"damaged \(unreadable"),
    "old-format": (lambda d: (d / "meta.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "arrays"})),
        "meta.json", r"damaged \(no checksums recorded\)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_view_is_reported_in_one_line_and_recomputed(two_modes, tmp_path, damage):
    hurt, file, reason = DAMAGES[damage]
    modes = discover_modes(two_modes)
    cache = ViewCache(tmp_path / "c")
    ex = extract(modes, _sources(), cache)
    clean = {(m, s.name, arr): np.array(getattr(ex.get(m, s), arr)) for m in ("seed-1000", "seed-1100")
             for s in _sources() for arr in ("logits", "features", "labels")}  # copies: the maps go with the files
    del ex
    folder = _view_folder(cache.root, "seed-1000", "letters")
    others = {k: v for k, v in snapshot(cache.root).items() if not k.startswith(str(folder.relative_to(cache.root)))}
    hurt(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = extract(discover_modes(two_modes), _sources(), cache)
    msgs = [str(w.message) for w in caught if issubclass(w.category, OodensWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert msgs[0].startswith(f"cached view letters/test {file} of mode seed-1000 (")
    assert re.search(reason + r".*: recomputing$", msgs[0]), msgs[0]
    assert (again.computed, again.cached) == (1, 3)  # the damaged view only; nothing else recomputed
    for (m, name, arr), want in clean.items():
        src = next(s for s in _sources() if s.name == name)
        np.testing.assert_array_equal(getattr(again.get(m, src), arr), want)
    after = snapshot(cache.root)
    assert all(after[k] == v for k, v in others.items())  # every other view untouched
    assert not [p for p in cache.root.rglob("*") if p.name.startswith((".tmp-", ".damaged-"))]
    assert ViewCache.is_complete(folder)
    with warnings.catch_warnings(record=True) as caught:  # and it is whole again: no more warnings
        warnings.simplefilter("always")
        assert extract(discover_modes(two_modes), _sources(), cache).computed == 0
    assert not caught


def test_bit_flip_through_the_cli_warns_once_and_gives_the_clean_numbers(two_modes, tmp_path, capsys):
    args = ["eval", "--modes", str(two_modes), "--detector", "msp", "--json", "--results", str(tmp_path / "r")]
    code, clean_out, err = run(args + ["--cache-dir", str(tmp_path / "clean")], capsys)
    assert code == 0, err
    code, _, err = run(args + ["--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    _flip(_view_folder(tmp_path / "c", "seed-1000", "letters") / "logits.npy")
    code, out, err = run(args + ["--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: cached view letters/test logits.npy of mode seed-1000 (")
    assert lines[0].endswith("is damaged (checksum mismatch): recomputing")
    assert json.loads(out) == json.loads(clean_out)  # the numbers of an undamaged cache


def test_copied_cache_is_verified_once_and_kept(two_modes, tmp_path):
    """New mtimes (a copy) mean a full checksum; matching files are used, and the record is refreshed."""
    cache = ViewCache(tmp_path / "c")
    extract(discover_modes(two_modes), _sources(), cache)
    shutil.copytree(tmp_path / "c", tmp_path / "copy", copy_function=shutil.copy)  # content same, mtime new
    folder = _view_folder(tmp_path / "copy", "seed-1000", "letters")
    old = json.loads((folder / "meta.json").read_text())["arrays"]["logits"]["mtime_ns"]
    assert (folder / "logits.npy").stat().st_mtime_ns != old
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = extract(discover_modes(two_modes), _sources(), ViewCache(tmp_path / "copy"))
    assert not [w for w in caught if issubclass(w.category, OodensWarning)]
    assert again.computed == 0
    rec = json.loads((folder / "meta.json").read_text())["arrays"]["logits"]
    assert rec["mtime_ns"] == (folder / "logits.npy").stat().st_mtime_ns


def test_meta_records_size_mtime_sha256_shape_dtype(two_modes, tmp_path):
    cache = ViewCache(tmp_path / "c")
    extract(discover_modes(two_modes), _sources(), cache)
    folder = _view_folder(cache.root, "seed-1100", "digits")
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["arrays"]) == {"logits", "features", "labels"}
    import hashlib

    for name, rec in meta["arrays"].items():
        f = folder / f"{name}.npy"
        arr = np.load(f)
        assert rec["shape"] == list(arr.shape) and rec["dtype"] == arr.dtype.str
        assert rec["size"] == f.stat().st_size and rec["mtime_ns"] == f.stat().st_mtime_ns
        assert rec["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert meta["arch"] == "cnn" and meta["num_outputs"] == 6


def test_a_folder_in_the_way_without_meta_does_not_block_publishing(tmp_path):
    """The unlocked path (torchrun's rank 0): an interrupted folder at the final name is replaced."""
    final = tmp_path / "v" / "view"
    final.mkdir(parents=True)
    (final / "logits.npy").write_bytes(b"half")
    w = ViewWriter(final, {"mode": "x"})
    w.allocate("logits", (3, 2), np.float32)[:] = 1.0
    w.commit()
    assert ViewCache.is_complete(final)
    np.testing.assert_array_equal(ViewCache.read(final)["logits"], np.ones((3, 2), np.float32))
    assert [p.name for p in final.parent.iterdir()] == ["view"]


# ------------------------------------------------------------------ a full disk


def _fallocate_fails(err: int):
    def fail(fd, offset, length):
        raise OSError(err, os.strerror(err))
    return fail


def test_full_disk_is_one_line_and_leaves_no_temp_and_published_views_untouched(two_modes, tmp_path, monkeypatch,
                                                                                  capsys):
    cache = ViewCache(tmp_path / "c")
    b = get_benchmark("digits")
    extract(discover_modes(two_modes), [b.id_test], cache)  # published views to keep
    before = snapshot(cache.root)
    monkeypatch.setattr(os, "posix_fallocate", _fallocate_fails(errno.ENOSPC))
    with pytest.raises(OodensError) as e:
        extract(discover_modes(two_modes), [b.id_test, b.ood["letters"]], cache)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.fullmatch(
        r"no space left on device for view \S+/letters-test-[0-9a-f]{16}/labels\.npy: needs [\d.]+ kB "
        r"\(free: [\d.]+ [kMG]?B\): free space or point --cache-dir elsewhere", msg), msg
    after = snapshot(cache.root)
    assert all(after[k] == v for k, v in before.items())
    assert all(k.endswith(".lock") for k in set(after) - set(before))  # new: only the lock of the failed view
    assert not list(cache.root.rglob(".tmp-*"))

    # the same through the CLI: one line, exit 2, nothing published touched
    code, out, err = run(["extract", "--modes", str(two_modes), "--cache-dir", str(cache.root)], capsys)
    assert code == 2
    lines = messages(err)
    assert len(lines) == 1 and lines[0].startswith("oodens: error: no space left on device for view "), err
    assert all(snapshot(cache.root)[k] == v for k, v in before.items())
    assert not list(cache.root.rglob(".tmp-*"))

    monkeypatch.undo()  # space again: the run completes
    assert extract(discover_modes(two_modes), [b.id_test, b.ood["letters"]], cache).computed == 2


def test_io_error_while_reserving_is_one_line(two_modes, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _fallocate_fails(errno.EIO))
    with pytest.raises(OodensError, match=r"^cannot write view \S+\.npy: Input/output error \(errno 5\)"):
        extract(discover_modes(two_modes), _sources(), ViewCache(tmp_path / "c"))
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def test_without_fallocate_space_is_reserved_by_ordinary_writes(two_modes, tmp_path, monkeypatch):
    """A file system without fallocate (EOPNOTSUPP): the data region is written with zeros instead; same views."""
    b = get_benchmark("digits")
    ref = extract(discover_modes(two_modes), [b.id_test], ViewCache(tmp_path / "ref"))
    monkeypatch.setattr(os, "posix_fallocate", _fallocate_fails(errno.EOPNOTSUPP))
    got = extract(discover_modes(two_modes), [b.id_test], ViewCache(tmp_path / "c"))
    for m in ("seed-1000", "seed-1100"):
        for arr in ("logits", "features", "labels"):
            np.testing.assert_array_equal(getattr(got.get(m, b.id_test), arr), getattr(ref.get(m, b.id_test), arr))


def _unshare_works(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    mnt = tmp_path / "probe"
    mnt.mkdir()
    ok = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                        capture_output=True).returncode == 0
    mnt.rmdir()
    return ok


def test_full_tmpfs_is_one_line_not_sigbus(two_modes, tmp_path):
    """A real full disk: a 600 kB tmpfs (mounted in a user namespace, no root needed where allowed)."""
    if not _unshare_works(tmp_path):
        pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=600k tmpfs {mnt} && {sys.executable} -m oodens extract --modes {two_modes} "
              f"--cache-dir {mnt}/c; echo rc=$?; find {mnt} -name '.tmp-*' | wc -l")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    out_lines = proc.stdout.split()
    assert "rc=2" in out_lines, (proc.stdout, proc.stderr[-2000:])  # not 135 (SIGBUS)
    assert out_lines[-1] == "0"  # no temp folder keeps the disk full
    err = messages(proc.stderr)  # progress lines of the views extracted before the disk filled aside
    assert len(err) == 1 and err[0].startswith("oodens: error: no space left on device for view "), proc.stderr
    assert "free space or point --cache-dir elsewhere" in err[0]


# ------------------------------------------------------------------ read-only cache


def test_read_only_cold_cache_is_one_line_and_warm_one_still_reads(two_modes, tmp_path, capsys):
    cache = tmp_path / "ro"
    cache.mkdir()
    cmd = [sys.executable, "-m", "oodens", "extract", "--modes", str(two_modes), "--cache-dir", str(cache)]
    if os.geteuid() != 0:
        cache.chmod(0o555)
        try:
            code, _, err = run(cmd[3:], capsys)
        finally:
            cache.chmod(0o755)
        assert code == 2
        lines = messages(err)
        assert len(lines) == 1 and lines[0].startswith(f"oodens: error: view cache {cache} is not writable: "), err
        return
    if not _unshare_works(tmp_path):
        pytest.skip("running as root and cannot mount a read-only folder here")
    warm = tmp_path / "warm"
    code, _, err = run(cmd[3:-1] + [str(warm)], capsys)
    assert code == 0, err
    before = snapshot(warm)
    shell = " ".join(cmd[:-1])
    script = (f"mount -t tmpfs -o ro tmpfs {cache} && {shell} {cache}; echo rc=$?; "
              f"mount --bind {warm} {warm} && mount -o remount,ro,bind {warm} && {shell} {warm}; echo rc=$?")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["rc=2", "rc=0"], (proc.stdout, proc.stderr[-2000:])
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err[0].startswith(f"oodens: error: view cache {cache} is not writable: Read-only file system"), err
    assert err[0].endswith("expected a writable folder for the views it lacks; point --cache-dir elsewhere")
    assert "0 views extracted" in err[1] and len(err) == 2, err
    assert snapshot(warm) == before


# ------------------------------------------------------------------ concurrency

RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import oodens.views.extract as E
    from oodens.data import get_benchmark
    from oodens.modes.discovery import discover_modes
    from oodens.views.cache import ViewCache

    sync, passes = Path(sys.argv[3]), Path(sys.argv[4])
    real_lock, real_compute = ViewCache.lock, E._compute_into
    first = {"lock": True}

    def lock(self, path):
        if first["lock"]:  # both processes have planned (found the view missing) before either locks
            first["lock"] = False
            (sync / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(list(sync.iterdir())) < 2 and time.time() < deadline:
                time.sleep(0.05)
        return real_lock(self, path)

    def compute(model, **kw):
        with open(passes, "a") as f:
            f.write(f"{os.getpid()} {kw['source'].name}\\n")
        time.sleep(1.0)  # a slow pass: the other process is waiting on the lock meanwhile
        real_compute(model, **kw)

    ViewCache.lock, E._compute_into = lock, compute
    ex = E.extract(discover_modes(Path(sys.argv[1]))[:1], [get_benchmark("digits").ood["letters"]],
                   ViewCache(Path(sys.argv[2])))
    print(json.dumps({"computed": ex.computed, "cached": ex.cached}))
    """
)


def test_two_processes_on_one_cold_view_compute_it_once(two_modes, tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    sync = tmp_path / "sync"
    sync.mkdir()
    passes = tmp_path / "passes.txt"
    cmd = [sys.executable, str(script), str(two_modes), str(tmp_path / "c"), str(sync), str(passes)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert len(list(sync.iterdir())) == 2  # both got past planning with the view missing
    counts = sorted((json.loads(o[0])["computed"], json.loads(o[0])["cached"]) for o in outs)
    assert counts == [(0, 1), (1, 0)]  # one computed it, the other waited and read it
    assert len(passes.read_text().splitlines()) == 1  # exactly one forward pass over the set
    assert not list((tmp_path / "c").rglob(".tmp-*"))


# ------------------------------------------------------------------ a view belongs to its model


def test_another_arch_misses_the_warm_cache_and_fails_as_on_a_cold_one(two_modes, tmp_path):
    modes = discover_modes(two_modes)
    cache = ViewCache(tmp_path / "c")
    extract(modes, _sources(), cache)
    before = snapshot(cache.root)
    wrong = [dataclasses.replace(m, arch="R18") for m in modes]
    with pytest.raises(OodensError, match=r"does not fit architecture 'R18'") as warm:
        extract(wrong, _sources(), cache)
    with pytest.raises(OodensError) as cold:
        extract(wrong, _sources(), ViewCache(tmp_path / "cold"))
    assert str(warm.value) == str(cold.value)
    assert all(snapshot(cache.root)[k] == v for k, v in before.items())
    b = get_benchmark("digits")
    m = modes[0]
    keys = {cache.path(m.sha256, b.id_test.identity(), {}, model=model_identity(x)) for x in
            (m, wrong[0], dataclasses.replace(m, sidecar={**m.sidecar, "kept_classes": [0, 1, 2]}))}
    assert len(keys) == 3  # architecture and head width are in the key


def test_eval_with_a_wrong_arch_flag_is_refused_on_a_warm_cache(two_modes, tmp_path, capsys):
    plain = tmp_path / "plain"
    for name in ("seed-1000", "seed-1100"):  # checkpoints without sidecars: the flags say what they are
        (plain / name).mkdir(parents=True)
        shutil.copy(two_modes / name / "checkpoint.pth.tar", plain / name)
    base = ["eval", "--modes", str(plain), "--detector", "msp", "--num-classes", "6", "--benchmark", "digits",
            "--json", "--results", str(tmp_path / "r"), "--cache-dir"]
    code, _, err = run(base + [str(tmp_path / "warm"), "--arch", "cnn"], capsys)
    assert code == 0, err
    code, _, cold = run(base + [str(tmp_path / "cold"), "--arch", "R18"], capsys)
    code_warm, _, warm = run(base + [str(tmp_path / "warm"), "--arch", "R18"], capsys)
    assert code == code_warm == 2
    assert warm.count("\n") == 1 and "does not fit architecture 'R18'" in warm, warm
    assert warm == cold
