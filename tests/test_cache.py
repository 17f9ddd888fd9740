"""The view cache: extract once, recompute only what changed, crash- and race-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from oodens.data import get_benchmark, get_preset
from oodens.modes.discovery import Mode, discover_modes
from oodens.runtime.paths import default_cache_dir
from oodens.views.cache import ViewCache
from oodens.views.extract import export_views, extract

from conftest import snapshot


def _sources():
    b = get_benchmark("digits")
    return [b.id_train, b.id_test, *b.ood.values()]


def _all_views(ex):
    return {(m, s): v for m, by in ex.views.items() for s, v in by.items()}


def _assert_same_views(a, b):
    va, vb = _all_views(a), _all_views(b)
    assert va.keys() == vb.keys()
    for k in va:
        for arr in ("logits", "features", "labels"):
            np.testing.assert_array_equal(getattr(va[k], arr), getattr(vb[k], arr))


def test_views_match_a_direct_forward_pass(two_modes, tmp_path):
    modes = discover_modes(two_modes)
    ex = extract(modes, _sources(), ViewCache(tmp_path / "c"), batch_size=100)
    b = get_benchmark("digits")
    for m in modes:
        net = m.load()
        x, y = b.ood["letters"].arrays
        with torch.no_grad():
            z = net(get_preset("digits").normalize(torch.from_numpy(x))).numpy()
        v = ex.get(m.name, b.ood["letters"])
        np.testing.assert_allclose(v.logits, z, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(v.labels, y)
        assert v.features.shape == (len(x), 128)
        # features -> head gives the logits
        w, bias = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
        np.testing.assert_allclose(np.asarray(v.features) @ w.T + bias, v.logits, rtol=1e-4, atol=1e-4)


def test_second_run_does_no_forward_pass(two_modes, tmp_path, monkeypatch):
    modes = discover_modes(two_modes)
    cache = ViewCache(tmp_path / "c")
    first = extract(modes, _sources(), cache)
    assert (first.computed, first.cached) == (10, 0)

    def boom(self):
        raise AssertionError("the network was loaded although every view is cached")

    monkeypatch.setattr(Mode, "load", boom)
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: boom(None))
    second = extract(discover_modes(two_modes), _sources(), cache)
    assert (second.computed, second.cached) == (0, 10)
    _assert_same_views(first, second)


def test_changed_checkpoint_recomputes_only_its_views(two_modes, tmp_path):
    cache = ViewCache(tmp_path / "c")
    first = extract(discover_modes(two_modes), _sources(), cache)
    before = snapshot(cache.root)
    ckpt = two_modes / "seed-1100" / "checkpoint.pth.tar"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["fc.bias"] += 1.0
    torch.save(state, ckpt)
    again = extract(discover_modes(two_modes), _sources(), cache)
    assert (again.computed, again.cached) == (5, 5)
    after = snapshot(cache.root)
    assert all(after[k] == v for k, v in before.items())  # old views untouched
    for split, old in first.views["seed-1100"].items():
        new = again.views["seed-1100"][split]
        np.testing.assert_array_equal(new.features, old.features)  # the body did not change
        np.testing.assert_allclose(new.logits, np.asarray(old.logits) + 1.0, atol=1e-5)  # the bias did
    for split, old in first.views["seed-1000"].items():
        np.testing.assert_array_equal(again.views["seed-1000"][split].logits, old.logits)


def test_default_cache_dir_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere" / "oodens"


def test_export_writes_plain_numpy(two_modes, tmp_path):
    ex = extract(discover_modes(two_modes), _sources(), ViewCache(tmp_path / "c"))
    export_views(ex, tmp_path / "out")
    b = get_benchmark("digits")
    f = tmp_path / "out" / "seed-1000" / "digits" / "train"
    assert np.load(f / "features.npy").shape == (len(b.id_train), 128)
    assert np.load(tmp_path / "out" / "seed-1100" / "noise" / "test" / "logits.npy").shape == (len(b.ood["noise"]), 6)
    np.testing.assert_array_equal(np.load(f / "labels.npy"), b.id_train.arrays[1])


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import oodens.views.extract as E
    from oodens.data import get_benchmark
    from oodens.modes.discovery import discover_modes
    from oodens.views.cache import ViewCache

    calls = {"n": 0}
    real = E._compute_into

    def dying(model, *, on_batch, **kw):
        def counting():
            calls["n"] += 1
            if calls["n"] == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)  # as hard as it gets: no cleanup runs
            on_batch()
        real(model, on_batch=counting, **kw)

    E._compute_into = dying
    b = get_benchmark("digits")
    E.extract(discover_modes(Path(sys.argv[1])), [b.id_train, b.id_test, *b.ood.values()],
              ViewCache(Path(sys.argv[2])), batch_size=64)
    """
)


@pytest.mark.parametrize("kill_at", [3, 29])
def test_sigkill_midway_leaves_no_half_view_and_next_run_completes(two_modes, tmp_path, kill_at):
    cache_dir = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(two_modes), str(cache_dir), str(kill_at)])
    assert proc.returncode == -signal.SIGKILL
    cache = ViewCache(cache_dir)
    temps = list(cache_dir.rglob(".tmp-*"))
    assert temps, "the kill should have interrupted a view in progress"
    # every published view is complete and readable
    complete = [p for p in cache_dir.rglob("*") if p.is_dir() and ViewCache.is_complete(p)]
    published = [p for p in complete if json.loads((p / "meta.json").read_text())["view"]["kind"] == "base"]
    for p in published:
        v = ViewCache.read(p)
        assert len(v["logits"]) == len(v["features"]) == len(v["labels"])
    # the batch size of the killed run: a view's last bits may depend on the batch size (the BLAS kernels block a
    # batch of 64 and one of 256 differently on some CPUs), and the views published before the kill are kept
    resumed = extract(discover_modes(two_modes), _sources(), cache, batch_size=64)
    assert resumed.cached == len(published) and resumed.computed == 10 - len(published)
    assert not list(cache_dir.rglob(".tmp-*")), "stale temp folders of the dead process are cleaned"
    clean = extract(discover_modes(two_modes), _sources(), ViewCache(tmp_path / "clean"), batch_size=64)
    _assert_same_views(resumed, clean)


def test_two_evals_at_once_on_one_cache_equal_one(two_modes, tmp_path):
    env = {**os.environ}
    cmd = [sys.executable, "-m", "oodens", "eval", "--modes", str(two_modes), "--detector", "msp,knn", "--json",
           "--cache-dir", str(tmp_path / "shared-cache")]
    procs = [subprocess.Popen(cmd + ["--results", str(tmp_path / f"r{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    single = subprocess.run(cmd[:-2] + ["--cache-dir", str(tmp_path / "alone"), "--results", str(tmp_path / "r")],
                            capture_output=True, env=env, check=True)
    recs = [json.loads(o[0]) for o in outs]
    assert recs[0] == recs[1] == json.loads(single.stdout)
    assert not list((tmp_path / "shared-cache").rglob(".tmp-*"))
    complete = [p for p in (tmp_path / "shared-cache").rglob("*") if p.is_dir() and ViewCache.is_complete(p)]
    assert len(complete) == 10 + 2  # 2 modes x 5 splits, and each mode's head


def test_bf16_views_are_other_views_close_to_fp32(two_modes, tmp_path):
    modes = discover_modes(two_modes)
    b = get_benchmark("digits")
    cache = ViewCache(tmp_path / "c")
    fp32 = extract(modes, [b.id_test], cache)
    bf16 = extract(modes, [b.id_test], cache, precision="bf16", channels_last=True)
    assert bf16.computed == 2 and fp32.computed == 2  # another key: nothing reused, nothing overwritten
    again = extract(modes, [b.id_test], cache)
    assert again.computed == 0
    z32 = np.asarray(fp32.get("seed-1000", b.id_test).logits)
    z16 = np.asarray(bf16.get("seed-1000", b.id_test).logits)
    assert not np.array_equal(z32, z16)
    np.testing.assert_allclose(z16, z32, atol=0.1 * np.abs(z32).max())
    assert (z16.argmax(1) == z32.argmax(1)).mean() > 0.95
    with pytest.raises(Exception, match="precision"):
        extract(modes, [b.id_test], cache, precision="int8")


def test_torchrun_sharded_views_equal_single_process_views(two_modes, tmp_path):
    """2 gloo processes share each pass; rank 0 writes: the views equal one process's, bit for bit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "oodens", "extract", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "dist"),
           "--batch-size", "64", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "views extracted" in proc.stderr
    assert not list((tmp_path / "dist").rglob(".shards-*")) and not list((tmp_path / "dist").rglob(".tmp-*"))
    single = extract(discover_modes(two_modes), _sources(), ViewCache(tmp_path / "one"), batch_size=64)
    sharded = extract(discover_modes(two_modes), _sources(), ViewCache(tmp_path / "dist"), batch_size=64)
    assert sharded.computed == 0  # everything was written by the torchrun run
    _assert_same_views(single, sharded)
