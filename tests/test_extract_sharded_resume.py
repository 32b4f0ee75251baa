"""``cpnn extract``: shards, job lists, failure records, and a run killed part-way then resumed."""
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
from cpnn.cli_extract import register
from cpnn.encoders import read_feature_file
from cpnn.errors import CPNNInputError
from cpnn.workflows.batch_extract import (
    ExtractSettings,
    SlideJob,
    is_done,
    parse_shard,
    resolve_slides,
    shard_slides,
)


def _slides(folder: Path, n: int, px: int = 768, seed: int = 0) -> Path:
    """``n`` small H&E-coloured PNGs and a job list giving each one's mpp (PNGs have none)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,mpp"]
    for i in range(n):
        base = np.array([200, 110, 170]) + rng.integers(-20, 20, size=3)
        img = np.clip(base + rng.normal(0, 25, size=(px, px, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"slide{i:02d}.png")
        lines.append(f"slide{i:02d}.png,0.5")
    (folder / "slides.csv").write_text("\n".join(lines) + "\n")
    return folder / "slides.csv"


def _cmd(job_list: Path, out: Path, *extra: str):
    return [sys.executable, "-m", "cpnn.cli_extract", "--slides", str(job_list), "--out", str(out),
            "--min-tissue", "0", "--threads", "1", "--batch-size", "8", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_parse_shard_and_round_robin(tmp_path):
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "1-3", "a/b", "0/0"):
        with pytest.raises(CPNNInputError, match="--shard"):
            parse_shard(bad)
    jobs = [SlideJob(Path(f"/x/s{i}.svs")) for i in range(10)]
    shards = [shard_slides(jobs, i, 3) for i in range(3)]
    # every slide in exactly one shard, sizes differ by at most one
    flat = sorted(str(j.path) for s in shards for j in s)
    assert flat == sorted(str(j.path) for j in jobs)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_resolve_slides_globs_lists_and_collisions(tmp_path):
    lst = _slides(tmp_path / "a", 3, px=64)
    jobs = resolve_slides([lst])
    assert [j.path.name for j in jobs] == ["slide00.png", "slide01.png", "slide02.png"]
    assert all(j.mpp == 0.5 for j in jobs)
    globbed = resolve_slides([str(tmp_path / "a" / "*.png")])
    assert [j.path for j in globbed] == [j.path for j in jobs] and all(j.mpp is None for j in globbed)
    with pytest.raises(CPNNInputError, match="matches no file"):
        resolve_slides([str(tmp_path / "nothing" / "*.svs")])
    _slides(tmp_path / "b", 1, px=64)
    with pytest.raises(CPNNInputError, match="share the file name"):
        resolve_slides([str(tmp_path / "a" / "slide00.png"), str(tmp_path / "b" / "slide00.png")])
    bad = tmp_path / "bad.csv"
    bad.write_text("a/slide00.png,half\n")
    with pytest.raises(CPNNInputError, match=r"\[mpp\].*line 1"):
        resolve_slides([bad])


def test_register_adds_subcommand():
    import argparse

    parser = argparse.ArgumentParser(prog="cpnn")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["extract", "--slides", "x.svs", "--out", "o", "--shard", "1/4"])
    assert args.command == "extract" and args.shard == "1/4" and callable(args.func)


def test_failed_slide_is_recorded_and_others_finish(tmp_path):
    lst = _slides(tmp_path / "s", 2, px=256)
    broken = tmp_path / "s" / "broken.svs"
    broken.write_bytes(b"not a slide at all" * 100)
    nompp = tmp_path / "s" / "nompp.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(nompp)
    out = tmp_path / "out"
    rc = extract_main(["--slides", str(lst), str(broken), str(nompp), "--out", str(out), "--workers", "0",
                       "--min-tissue", "0", "--quiet", "--threads", str(_threads())])
    assert rc == 1
    failed = json.loads((out / "failed.json").read_text())["failed"]
    by_name = {Path(f["slide"]).name: f for f in failed}
    assert set(by_name) == {"broken.svs", "nompp.png"}
    assert "broken.svs" in by_name["broken.svs"]["error"]
    assert "[mpp]" in by_name["nompp.png"]["error"] and "nompp.png" in by_name["nompp.png"]["error"]
    for i in range(2):
        assert (out / f"slide{i:02d}.done.json").is_file()
        ff = read_feature_file(out / f"slide{i:02d}.h5")
        assert ff.features.shape == (1, 1280)  # 256 px at 0.5 mpp = one 256-px tile
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["done"]) == 2 and len(summary["failed"]) == 2


def _threads():
    import torch

    return torch.get_num_threads()  # keep this process's torch thread count unchanged


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_slides(tmp_path):
    lst = _slides(tmp_path / "slides", 4)
    # a clean, uninterrupted run for reference
    clean = tmp_path / "clean"
    proc = subprocess.run(_cmd(lst, clean), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    p = subprocess.Popen(_cmd(lst, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.done.json")):
            assert p.poll() is None, "the run ended before any slide finished"
            assert time.monotonic() < deadline, "no slide finished in time"
            time.sleep(0.02)
    finally:
        # SIGKILL the launcher and its worker process (its own session/process group)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    finished = sorted(out.glob("*.done.json"))
    assert 1 <= len(finished) < 4, f"kill came too late to test resuming ({len(finished)} done)"
    stamps = {f: f.stat().st_mtime_ns for f in finished}
    stamps.update({f.with_name(f.name.replace(".done.json", ".h5")): None for f in finished})
    stamps = {f: f.stat().st_mtime_ns for f in stamps}

    proc = subprocess.run(_cmd(lst, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["skipped"]) == len(finished)
    assert len(summary["done"]) == 4 - len(finished)
    for f, mtime in stamps.items():
        assert f.stat().st_mtime_ns == mtime, f"{f.name} was rewritten"
    assert not list(out.glob(".*.part")), "temporary files of the killed attempt were left behind"
    settings = ExtractSettings(min_tissue=0.0, batch_size=8)
    for job in resolve_slides([lst]):
        assert is_done(out, job, settings)
        a = read_feature_file(out / f"{job.stem}.h5")
        b = read_feature_file(clean / f"{job.stem}.h5")
        assert a.features.shape == (9, 1280)
        assert a.features.tobytes() == b.features.tobytes()
        np.testing.assert_array_equal(a.coords, b.coords)
    # a third run has nothing left to do
    proc = subprocess.run(_cmd(lst, out, "--shard", "0/1"), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "0 extracted, 4 skipped" in proc.stdout
