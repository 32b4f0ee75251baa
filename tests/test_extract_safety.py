"""``cpnn extract`` never trusts a damaged output, never races a second run, never outlives
its parent, and refuses a bad ``--out`` before any work (issue 16, case 6/7/8)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpnn.cli_extract import main as extract_main
from cpnn.errors import CPNNInputError
from cpnn.workflows.batch_extract import ExtractSettings, extract_slides, is_done, resolve_slides

torch = pytest.importorskip("torch")


def _tiny_settings() -> ExtractSettings:
    from _tiny_encoder import TINY, register_tiny

    register_tiny()
    return ExtractSettings(encoder=TINY, tile_px=32, target_mpp=2.0, min_tissue=0.0, mpp=0.5, batch_size=8)


def _slide(folder: Path, name="s0.png", seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = np.clip(np.array([200, 110, 170]) + rng.normal(0, 25, size=(256, 256, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / name)
    return folder / name


def test_corrupt_finished_file_of_the_same_size_is_redone(tmp_path):
    torch.set_num_threads(1)
    settings = _tiny_settings()
    slide = _slide(tmp_path / "slides")
    out = tmp_path / "out"
    first = extract_slides([slide], out, settings, workers=0, log=None)
    assert len(first["done"]) == 1
    job = resolve_slides([slide])[0]
    h5 = out / "s0.h5"
    data = bytearray(h5.read_bytes())
    data[-200:-100] = bytes(100)  # same size, different bytes
    h5.write_bytes(bytes(data))
    assert not is_done(out, job, settings)
    again = extract_slides([slide], out, settings, workers=0, log=None)
    assert len(again["done"]) == 1 and not again["skipped"]
    marker = json.loads((out / "s0.done.json").read_text())
    import hashlib

    assert marker["h5_sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    assert is_done(out, job, settings)


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    from cpnn.outputs import FolderLock

    slide = _slide(tmp_path / "slides")
    out = tmp_path / "out"
    out.mkdir()
    part = out / ".s0.abc.h5.part"
    part.write_bytes(b"being written by the first run")
    with FolderLock(out, ".cpnn-extract.lock", "another `cpnn extract` of this shard"):
        with pytest.raises(CPNNInputError, match="already writing into this folder"):
            extract_slides([slide], out, _tiny_settings(), workers=0, log=None)
    assert part.exists()  # the first run's partial file survived
    # other shards may share the folder
    with FolderLock(out, ".cpnn-extract.shard0-of-2.lock", "x"):
        with FolderLock(out, ".cpnn-extract.shard1-of-2.lock", "y"):
            pass


def test_out_that_is_a_file_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import cpnn.workflows.batch_extract as be

    slide = _slide(tmp_path / "slides")
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    monkeypatch.setattr(be, "extract_one", lambda *a, **k: pytest.fail("work started"))
    assert extract_main(["--slides", str(slide), "--out", str(f), "--mpp", "0.5"]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep"


def test_disk_full_is_reported_per_slide(tmp_path, monkeypatch):
    import cpnn.outputs as outputs

    slide = _slide(tmp_path / "slides")
    monkeypatch.setattr(outputs, "free_bytes", lambda p: 4096)
    res = extract_slides([slide], tmp_path / "out", _tiny_settings(), workers=0, log=None)
    assert res["failed"] and "disk full at" in res["failed"][0]["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_dies_with_its_parent(tmp_path):
    """kill -9 of the parent: the worker (here a stand-in that only sleeps) goes too."""
    pidfile = tmp_path / "child.pid"
    child = ("import os, sys, time; from cpnn.workflows.batch_extract import die_with_parent; die_with_parent(); "
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for _ in range(100):
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as fh:
                    if fh.read().split()[2] == "Z":
                        break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the worker outlived its killed parent")
    finally:
        if p.poll() is None:
            p.kill()


def test_job_list_mpp_out_of_range_is_refused(tmp_path):
    slide = _slide(tmp_path / "slides")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"path,mpp\n{slide},1e-6\n")
    with pytest.raises(CPNNInputError, match=r"jobs.csv \[mpp \(line 2\)\].*plausible range"):
        resolve_slides([jobs])


def test_a_slide_being_extracted_elsewhere_is_not_touched(tmp_path):
    """Runs with other shard layouts may share --out: a slide another process is extracting
    is left alone (its .part survives) and reported, to be picked up by a rerun."""
    import multiprocessing as mp

    from cpnn.workflows.batch_extract import SLIDE_LOCKS

    slide = _slide(tmp_path / "slides")
    out = tmp_path / "out"
    out.mkdir()
    part = out / ".s0.xyz.h5.part"
    part.write_bytes(b"another run's half-written file")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_slide_lock, args=(str(out / SLIDE_LOCKS), "s0", ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        res = extract_slides([slide], out, _tiny_settings(), workers=0, log=None)
        assert res["failed"] and "another process is extracting s0.png" in res["failed"][0]["error"]
        assert part.exists()
    finally:
        release.set()
        holder.join(30)
    again = extract_slides([slide], out, _tiny_settings(), workers=0, log=None)
    assert len(again["done"]) == 1 and not part.exists()


def _hold_slide_lock(lock_file, key, ready, release):
    from cpnn.outputs import record_lock

    with record_lock(lock_file, key, "test"):
        ready.set()
        release.wait(60)
