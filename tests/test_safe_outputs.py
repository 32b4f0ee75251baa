"""Nothing lost, nothing overwritten, nothing written outside --out (issue 16).

Each test replays one way a careless or hostile user broke the CLI: ids that are paths,
stale feature caches, same-name inputs, half-old run folders, unrelated files replaced,
0600 outputs, unclear errors. Everything runs on a tiny seeded synthetic cohort with
precomputed features or a tiny registered encoder, so the whole file takes seconds.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")
torch = pytest.importorskip("torch")

import cpnn  # noqa: E402
from cpnn.cli import main  # noqa: E402
from cpnn.errors import CPNNInputError  # noqa: E402

from _tiny_encoder import TINY, signal_features as _features, register_tiny as _register_tiny  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three tiny sections, prototypes, feature files and a fitted run (via the CLI)."""
    from cpnn.data import make_synthetic_cohort, read_spatial_h5ad
    from cpnn.encoders import write_feature_file
    from cpnn.prototypes import reference_qc

    torch.set_num_threads(1)
    _register_tiny()
    root = tmp_path_factory.mktemp("issue16")
    c = make_synthetic_cohort(n_slides=3, n_types=3, n_genes=40, image_px=256, spot_pitch_um=30.0,
                              spot_diameter_um=28.0, n_ref_cells=150, seed=5)
    c.save(root / "cohort")
    (root / "feats").mkdir()
    for i, s in enumerate(c.slides):
        a = read_spatial_h5ad(root / "cohort" / f"{s.slide_id}.h5ad")
        write_feature_file(root / "feats" / f"{s.slide_id}.h5", _features(a, 8, i),
                           np.asarray(a.obsm["spatial"], dtype=np.int64), {"encoder": TINY},
                           ids=list(map(str, a.obs_names)))
    ref = reference_qc(c.reference, "cell_type", min_genes=5)
    cpnn.build_prototypes(ref, "cell_type", method="naive", genes=c.genes).save(root / "protos.h5ad")
    (root / "fit.yaml").write_text("train:\n  n_models: 1\n  max_epochs: 2\nmodel:\n  hidden: [8]\n"
                                   "  residual_head: none\n")
    h5 = [str(root / "cohort" / f"{s.slide_id}.h5ad") for s in c.slides]
    run = root / "run"
    assert main(["fit", "--h5ad", *h5[:2], "--features", str(root / "feats"), "--reference",
                 str(root / "protos.h5ad"), "--config", str(root / "fit.yaml"), "--out", str(run),
                 "--encoder", TINY, "--no-progress"]) == 0
    return dict(root=root, h5=h5, run=run, cohort=c)


def _fit_args(cohort, out, *extra):
    return ["fit", "--h5ad", *cohort["h5"][:2], "--features", str(cohort["root"] / "feats"), "--reference",
            str(cohort["root"] / "protos.h5ad"), "--config", str(cohort["root"] / "fit.yaml"), "--out", str(out),
            "--encoder", TINY, "--no-progress", *extra]


def _with_sample_id(src: str, dst: Path, sample_id: str) -> Path:
    a = ad.read_h5ad(src)
    a.uns["cpnn_input"] = {**dict(a.uns["cpnn_input"]), "sample_id": sample_id}
    a.write_h5ad(dst)
    return dst


def _tree(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# ------------------------------------------------------------------ 1. ids that are paths
@pytest.mark.parametrize("hostile", ["../../escaped", "/tmp/cpnn-issue16-abs", "a/b", "..", "bad\x07id"])
def test_sample_id_cannot_write_outside_out(cohort, tmp_path, hostile):
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    inputs = [_with_sample_id(cohort["h5"][2], work / "x1.h5ad", hostile),
              _with_sample_id(cohort["h5"][1], work / "x2.h5ad", "ok")]
    import shutil
    import warnings

    from cpnn.outputs import safe_stem

    feats = work / "feats"
    feats.mkdir()
    shutil.copy(cohort["root"] / "feats" / "S02.h5", feats / "ok.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            shutil.copy(cohort["root"] / "feats" / "S03.h5", feats / f"{safe_stem(hostile)}.h5")
        except CPNNInputError:
            pass
    before = _tree(tmp_path)
    out = work / "preds"
    try:
        rc = main(["predict", str(cohort["run"]), "--h5ad", *map(str, inputs), "--features",
                   str(feats), "--out", str(out), "--no-progress"])
    except CPNNInputError:
        rc = 2
    created = _tree(tmp_path) - before
    assert all(c.startswith("deep/er/preds") for c in created), created
    assert not Path("/tmp/cpnn-issue16-abs.h5ad").exists()
    if hostile == "..":  # nothing left of it: refused
        assert rc == 2 and not created
    else:  # cleaned into a file name inside --out
        assert rc == 0 and len(list(out.glob("*.h5ad"))) == 2


def test_safe_stem_rule():
    from cpnn.outputs import safe_stem

    with pytest.warns(UserWarning, match="not a safe file name"):
        assert safe_stem("../../x") == "_.._x"
    with pytest.warns(UserWarning):
        assert "/" not in safe_stem("/etc/passwd") and not safe_stem("/etc/passwd").startswith(".")
    assert safe_stem("C2") == "C2"
    for bad in ("", "..", "/", "\x00"):
        with pytest.raises(CPNNInputError, match="cannot be used as a file name"):
            safe_stem(bad)


# ------------------------------------------------------------------ 3. same-name inputs
def test_two_inputs_with_one_name_are_refused(cohort, tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a = _with_sample_id(cohort["h5"][0], tmp_path / "a" / "sample.h5ad", "sample")
    b = _with_sample_id(cohort["h5"][1], tmp_path / "b" / "sample.h5ad", "sample")
    rc = main(["predict", str(cohort["run"]), "--h5ad", str(a), str(b), "--features", str(cohort["root"] / "feats"),
               "--out", str(tmp_path / "preds"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "share the sample id 'sample'" in err and "Fix:" in err
    assert not (tmp_path / "preds").exists()


def test_plot_of_two_same_stem_predictions_is_refused(tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "pred.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n")
    rc = main(["plot", str(tmp_path / "a" / "pred.h5ad"), str(tmp_path / "b" / "pred.h5ad"),
               "--out", str(tmp_path / "figs")])
    assert rc == 2 and "pred" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


def test_plot_of_a_non_h5ad_is_a_clear_error(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    rc = main(["plot", str(notes), "--out", str(tmp_path / "figs")])
    err = capsys.readouterr().err
    assert rc == 2 and "notes.txt" in err and "Fix:" in err and "Traceback" not in err


# ------------------------------------------------------------------ 4. half-old run folders
def test_failed_refit_leaves_the_old_run_intact(cohort, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cohort["run"], run)
    before = {p: (run / p).read_bytes() for p in ("model.cpnn", "config.json", "prototypes.h5ad", "metrics.json")}
    import cpnn.workflows.fit as fit

    def boom(*a, **k):
        raise KeyboardInterrupt  # like Ctrl-C in training
    monkeypatch.setattr(fit, "fit_spot_model", boom)
    with pytest.raises(KeyboardInterrupt):
        main(_fit_args(cohort, run, "--genes", str(_six_genes(cohort, tmp_path))))
    after = {p: (run / p).read_bytes() for p in before}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial")]


def _six_genes(cohort, tmp_path) -> Path:
    p = tmp_path / "six.txt"
    p.write_text("\n".join(cohort["cohort"].genes[:6]) + "\n")
    return p


def test_refit_swaps_in_a_complete_run_with_a_manifest(cohort, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cohort["run"], run)
    (run / "figs").mkdir()
    (run / "figs" / "weights.png").write_bytes(b"png")  # the user's own files in the run folder
    (run / "notes.md").write_text("what I tried")
    assert main(_fit_args(cohort, run, "--genes", str(_six_genes(cohort, tmp_path)))) == 0
    assert (run / "figs" / "weights.png").read_bytes() == b"png" and (run / "notes.md").read_text() == "what I tried"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.cpnn", "config.json", "prototypes.h5ad", "metrics.json"}
    (run / "notes.md").write_text("edited later")  # the user's own file: not the manifest's business
    from cpnn.workflows.fit import load_run_model

    load_run_model(run)
    assert cpnn.CPNN.load(run / "model.cpnn").genes == cohort["cohort"].genes[:6]
    assert json.loads((run / "config.json").read_text())["used"]["n_genes"] == 6
    # a file changed behind the manifest's back: predict refuses the folder
    (run / "config.json").write_text((run / "config.json").read_text() + " ")
    with pytest.raises(CPNNInputError, match="differs from what `cpnn fit` wrote"):
        from cpnn.workflows.fit import load_run_model

        load_run_model(run)


def test_mixed_run_folder_without_manifest_is_refused(cohort, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cohort["run"], run)
    (run / "manifest.json").unlink()
    cfg = json.loads((run / "config.json").read_text())
    cfg["used"]["genes"] = cfg["used"]["genes"][:6]
    (run / "config.json").write_text(json.dumps(cfg))
    from cpnn.workflows.fit import load_run_model

    with pytest.raises(CPNNInputError, match="mixes two runs"):
        load_run_model(run)


def test_fit_out_must_not_be_a_file_or_a_foreign_folder(cohort, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(_fit_args(cohort, f)) == 2
    assert f.read_text() == "keep me"
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    assert main(_fit_args(cohort, home)) == 2
    assert (home / "thesis.tex").read_text() == "precious"
    err = capsys.readouterr().err
    assert "not a cpnn run folder" in err and "Fix:" in err


# ------------------------------------------------------------------ 5. / 13. predict --out
def test_predict_out_does_not_replace_an_unrelated_file(cohort, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    rc = main(["predict", str(cohort["run"]), "--h5ad", cohort["h5"][2], "--features", str(cohort["root"] / "feats"),
               "--out", str(notes), "--no-progress"])
    assert rc == 2 and notes.read_text() == "my notes"
    assert "notes.txt" in capsys.readouterr().err


def test_predict_out_existing_folder_is_refused_before_work(cohort, tmp_path, capsys, monkeypatch):
    import cpnn.workflows.fit as fit

    monkeypatch.setattr(fit, "attach_features", lambda *a, **k: pytest.fail("work started"))
    rc = main(["predict", str(cohort["run"]), "--h5ad", cohort["h5"][2], "--features", str(cohort["root"] / "feats"),
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 2 and "existing folder" in capsys.readouterr().err


def test_outputs_respect_the_umask(cohort, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "pred.h5ad"
        assert main(["predict", str(cohort["run"]), "--h5ad", cohort["h5"][2], "--features",
                     str(cohort["root"] / "feats"), "--out", str(out), "--no-progress"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    from cpnn.utils import write_json

    os.umask(0o077)
    try:
        write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o600


# ------------------------------------------------------------------ 2. stale feature cache
def _predict_extracting(cohort, h5, out):
    return main(["predict", str(cohort["run"]), "--h5ad", h5, "--out", str(out), "--no-progress"])


def test_rotated_image_invalidates_the_feature_cache(cohort, tmp_path):
    import shutil

    from PIL import Image

    src = ad.read_h5ad(cohort["h5"][2])
    img = tmp_path / "S03.png"
    shutil.copy(src.uns["cpnn_input"]["image_path"], img)
    h5 = tmp_path / "S03.h5ad"
    src.uns["cpnn_input"] = {**dict(src.uns["cpnn_input"]), "image_path": str(img)}
    src.write_h5ad(h5)
    assert _predict_extracting(cohort, str(h5), tmp_path / "p1.h5ad") == 0
    first = ad.read_h5ad(tmp_path / "p1.h5ad").X
    st = img.stat()
    Image.open(img).rotate(180).save(img)  # same name, same size in pixels
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    assert _predict_extracting(cohort, str(h5), tmp_path / "p2.h5ad") == 0
    second = ad.read_h5ad(tmp_path / "p2.h5ad").X
    assert not np.allclose(first, second)
    # and the cache now holds the rotated image's features: a third run agrees with the second
    assert _predict_extracting(cohort, str(h5), tmp_path / "p3.h5ad") == 0
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "p3.h5ad").X, second)


def test_cache_key_follows_the_pixels_of_an_array_slide(tmp_path):
    from cpnn.encoders import create_encoder, extract_spot_features
    from cpnn.image import ArraySlide

    _register_tiny()
    enc = create_encoder(TINY)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    centers = np.array([[40.0, 40.0], [100.0, 60.0], [120.0, 90.0]])
    out = tmp_path / "f.h5"
    a = extract_spot_features(ArraySlide(img, mpp=0.5), centers, ["a", "b", "c"], enc, out, patch_um=20,
                              progress=False).features
    flipped = np.ascontiguousarray(img[::-1, ::-1])
    b = extract_spot_features(ArraySlide(flipped, mpp=0.5), centers, ["a", "b", "c"], enc, out, patch_um=20,
                              progress=False).features
    assert not np.allclose(a, b)


# ------------------------------------------------------------------ 10. model in a read-only place
def test_model_in_a_read_only_place_caches_in_the_user_cache(cohort, tmp_path, monkeypatch):
    import cpnn.runfolder as rf

    real = rf._writable
    run = cohort["run"]
    monkeypatch.setattr(rf, "_writable", lambda p: False if str(p).startswith(str(run)) else real(p))
    monkeypatch.setenv("CPNN_CACHE_DIR", str(tmp_path / "cache"))
    before = _tree(run)
    assert _predict_extracting(cohort, cohort["h5"][2], tmp_path / "p.h5ad") == 0
    assert _tree(run) == before
    assert list((tmp_path / "cache" / "features").glob("*/S03.h5"))
    # neither writable: no cache at all, still a prediction
    monkeypatch.setattr(rf, "_writable", lambda p: False)
    assert rf.prediction_cache_dir(run) is None
    assert _predict_extracting(cohort, cohort["h5"][2], tmp_path / "q.h5ad") == 0


def test_unwritable_out_is_refused_before_work(cohort, capsys):
    rc = main(_fit_args(cohort, "/proc/cpnn-issue16-run"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write here" in err and "--out" in err


# ------------------------------------------------------------------ 8. disk full
def test_disk_full_is_named(tmp_path, monkeypatch):
    import errno

    import cpnn.outputs as outputs
    from cpnn.utils import atomic_path

    with pytest.raises(CPNNInputError, match=r"disk full at .*free space"):
        with atomic_path(tmp_path / "x.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
    # torch's zip writer says "unexpected pos" when the disk fills: judged by the free space
    monkeypatch.setattr(outputs, "free_bytes", lambda p: 1000)
    with pytest.raises(CPNNInputError, match="disk full"):
        with atomic_path(tmp_path / "model.cpnn"):
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")
    with pytest.raises(CPNNInputError, match="disk full"):
        outputs.check_free_space(tmp_path)


# ------------------------------------------------------------------ 7. benchmark subsets checked first
def _bench_config(cohort, tmp_path) -> Path:
    root = cohort["root"]
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "seed: 0\n"
        "data:\n  kind: h5ad\n  paths: [" + ", ".join(f'"{p}"' for p in cohort["h5"]) + "]\n"
        "split: {by: section, scheme: k_fold, n_folds: 3, val_fraction: 0.25}\n"
        f"features: {{features_dir: '{root / 'feats'}'}}\n"
        f"reference: {{path: '{root / 'cohort' / 'reference.h5ad'}', label: cell_type, qc: {{min_genes: 5}}}}\n"
        "gene_sets:\n  - {name: top10, kind: top_expressed, n: 10}\n"
        "methods:\n  - {name: ridge_hest, kind: ridge, alphas: hest, n_components: 4}\n")
    return cfg


@pytest.mark.parametrize("flags, words", [(["--folds", "99"], "unknown fold 99"),
                                          (["--methods", "nope"], "unknown method nope")])
def test_benchmark_bad_subset_is_refused_before_any_output(cohort, tmp_path, capsys, flags, words):
    out = tmp_path / "bench"
    rc = main(["benchmark", str(_bench_config(cohort, tmp_path)), "--out", str(out), "--quiet", "--no-progress",
               *flags])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Fix:" in err and "KeyError" not in err
    assert not out.exists()


def test_kill_9_during_refit_leaves_the_old_run_usable(cohort, tmp_path):
    """A real SIGKILL in the middle of training: the old run stays complete and predicts."""
    import shutil
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(cohort["run"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = _fit_args(cohort, run, "--genes", str(_six_genes(cohort, tmp_path)))
    code = ("import os, signal, sys\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from _tiny_encoder import register_tiny; register_tiny()\n"
            "import cpnn.workflows.fit as fit\n"
            "fit.fit_spot_model = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from cpnn.cli import main\n"
            f"main({args!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]
    assert leftovers  # the killed attempt's folder, never mixed into run/
    assert main(["predict", str(run), "--h5ad", cohort["h5"][2], "--features", str(cohort["root"] / "feats"),
                 "--out", str(tmp_path / "p.h5ad"), "--no-progress"]) == 0
    # the next fit removes the dead attempt's leftovers
    assert main(_fit_args(cohort, run)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]


def test_no_leading_dot_even_behind_spaces():
    """Found by the property suite: '. .0' kept a leading dot after one strip pass."""
    import warnings

    from cpnn.outputs import safe_stem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert safe_stem(". .0") == "0"
        assert safe_stem(" . ..x") == "x"
