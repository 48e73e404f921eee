"""Explaining a whole folder (masked_ops.dataset): one process, torchrun with gloo, kill and resume.

The folder: scikit-image's and scikit-learn's photos plus flipped and cropped copies in two class
folders, one corrupt JPEG and a text file (dataset_helpers.make_folder); the model: a tiny random
CNN at 64 x 64 (dataset_helpers.tiny_model), LIME with 16 samples on SLIC superpixels, so that the
multi-process runs take seconds.
"""
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from dataset_helpers import make_folder, tiny_model
from masked_ops import cli
from masked_ops.dataset import h5 as H
from masked_ops.dataset.folder import imagenet_wnids, model_class_index, scan_folder
from masked_ops.models import imagenet_classes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = "dataset_helpers:tiny_model"
MASKING = "layer,noise,grey"  # noise: a seeded stream, the state most likely to leak between images
ARGS = ["--model", MODEL, "--method", "lime", "--samples", "16", "--segments", "slic", "--n-segments", "10",
        "--masking", MASKING, "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset") / "photos"
    paths = make_folder(str(root))
    return str(root), paths


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The uninterrupted single-process run (default threads), made once for the module."""
    out = str(tmp_path_factory.mktemp("ref") / "ref.h5")
    previous = torch.get_num_threads()
    try:
        assert cli.main(["explain", folder[0], "--out", out] + ARGS) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("OMP_NUM_THREADS", None)  # the CLI's default must do the job
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, argv):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "masked_ops.cli"] + argv


def _same_file(a, b):
    """Every dataset and root attribute equal bit for bit (the /run group may differ)."""
    def walk(f):
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        da, db = walk(fa), walk(fb)
        assert sorted(da) == sorted(db)
        for name in da:
            x, y = np.asarray(da[name]), np.asarray(db[name])
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes() if x.dtype != object else x.tolist() == y.tolist(), name
        assert H.read_attrs(fa) == H.read_attrs(fb)


# ----------------------------------------------------------------------------- the folder
def test_scan_folder_order_labels_and_filters(tmp_path):
    for rel in ("b/2.png", "b/sub/1.JPG", "a/z.jpeg", "a/.hidden.png", ".cache/x.png", "a/readme.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    f = scan_folder(str(tmp_path))
    assert [it.path for it in f.items] == ["a/z.jpeg", "b/2.png", "b/sub/1.JPG"]
    assert [it.label_name for it in f.items] == ["a", "b", "b"] and f.classes == ["a", "b"]
    (tmp_path / "top.png").write_bytes(b"")  # an image at the top: no ImageFolder layout, no labels
    f = scan_folder(str(tmp_path))
    assert f.classes is None and {it.label_name for it in f.items} == {""}
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no image files"):
        scan_folder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        scan_folder(str(tmp_path / "nope"))


def test_class_folder_names_map_to_model_classes():
    names = imagenet_classes()
    # ImageNet's validation set in class folders: WordNet ids in sorted order; n02123045 is "tabby"
    wnids = imagenet_wnids()
    assert list(wnids) == sorted(wnids) and len(set(wnids)) == 1000
    assert names[model_class_index("n02123045", names)] == "tabby"
    assert names[model_class_index("n01440764", names)] == "tench"
    assert model_class_index("285", names) == 285 and model_class_index("1000", names) == -1
    assert names[model_class_index("Egyptian_cat", names)] == "Egyptian cat"
    assert model_class_index("not a class", names) == -1
    assert model_class_index("n02123045", ["a", "b"]) == -1  # a WordNet id means nothing to a 2-class model


# ----------------------------------------------------------------------------- one process
def test_single_process_output(folder, reference):
    root, paths = folder
    r = H.read_h5(reference)
    assert r["path"] == paths  # every readable image once, sorted; the text file ignored
    assert [p for p, _ in r["errors"]] == ["5/broken.jpg"] and "cannot be read" in r["errors"][0][1]
    assert r["label"].tolist() == [int(p.split("/")[0]) for p in paths]
    assert r["label_name"] == [p.split("/")[0] for p in paths]
    assert r["attrs"]["format"] == H.FORMAT and r["attrs"]["classes"] == ["1", "5"]
    assert r["attrs"]["threads_per_process"] == 1 and r["attrs"]["masking"] == MASKING.split(",")
    assert set(r["attributions"]) == set(MASKING.split(","))
    # the weights asked for ("default" when --weights is not given, never the string 'None') and, in
    # words, what was loaded
    assert r["attrs"]["weights"] == "default" and r["attrs"]["model_weights"] not in ("", "None")
    assert r["model_classes"] == [f"c{i}" for i in range(10)]

    # top-k against the model run directly on the same preprocessed image
    from masked_ops.images import load_image

    model, info = tiny_model()
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    for i in (0, len(paths) - 1):
        img = load_image(os.path.join(root, paths[i]))
        assert tuple(r["image_size"][i]) == tuple(img.shape[1:])
        with torch.no_grad():
            p = model((info.prepare(img) - mean) / std)[0].softmax(0)
        v, idx = p.topk(5)
        assert r["topk_class"][i].tolist() == idx.tolist() and r["target"][i] == idx[0]
        np.testing.assert_allclose(r["topk_prob"][i], v.numpy(), rtol=1e-5)
        # each map is the image's LIME weights spread over its segments: constant on every segment
        for s, maps in r["attributions"].items():
            seg, m = r["segments"][i], maps[i]
            for k in np.unique(seg):
                assert np.unique(m[seg == k]).size == 1, (s, k)
    assert not os.path.exists(reference + ".parts")
    assert stat.S_IMODE(os.stat(reference).st_mode) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_one_image_matches_the_explainer(folder, reference):
    """The runner's wiring (target, segments, seed, batches) against the explainer called directly."""
    from masked_ops.explain import explain_lime, get_strategy
    from masked_ops.explain.segmentation import segment
    from masked_ops.images import load_image

    root, paths = folder
    model, info = tiny_model()
    model = model.to(memory_format=torch.channels_last)
    r = H.read_h5(reference)
    i = 3
    x = info.prepare(load_image(os.path.join(root, paths[i])))[0]
    seg = segment(x, "slic", n_segments=10, seed=0)
    assert np.array_equal(seg.numpy(), r["segments"][i])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            exp = explain_lime(get_strategy("noise", model, seed=0), x, targets=[int(r["target"][i])],
                               segments=seg, num_samples=16, seed=0, progress=False)
    finally:
        torch.set_num_threads(prev)
    assert np.array_equal(exp.heatmap(0).numpy(), r["attributions"]["noise"][i])


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.slow  # subprocesses: ~10 s on an idle 2-core machine, ~40 s under load
def test_torchrun_two_processes_bit_identical(folder, reference, tmp_path):
    out = str(tmp_path / "two.h5")
    with_bar = [a for a in ARGS if a != "--no-progress"]  # rank 0's bar, written to a pipe: every draw shows
    res = subprocess.run(_torchrun(2, ["explain", folder[0], "--out", out] + with_bar), env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es) x 1 thread(s), backend gloo" in res.stdout
    # one bar (rank 0's), drawn once more per finished image, not once per poll while rank 0 waits for
    # rank 1: the final count appears at most twice (its draw, and the bar's close)
    total = len(folder[1]) + 1  # the readable images and the broken one
    draws = [d for d in re.split(r"[\r\n]", res.stderr) if d.startswith("explain:")]
    assert draws and sum(f"{total}/{total}" in d for d in draws) <= 2, draws[-6:]
    # rank 1's warning about the broken image starts a line of its own, never inside rank 0's bar
    assert "masked-ops: warning: 5/broken.jpg" in res.stderr
    assert not [d for d in draws if "masked-ops:" in d], [d for d in draws if "masked-ops:" in d]
    _same_file(reference, out)
    with h5py.File(out) as f:
        assert f["run"].attrs["world_size"] == 2


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill_tree(pid):
    """SIGKILL a process and all its descendants (the workers first), and wait until they are gone."""
    pids = _descendants(pid)
    for p in reversed(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids[1:]) and time.time() < deadline:
        time.sleep(0.05)


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _batch_files(parts):
    return [f for f in os.listdir(parts) if f.startswith("r") and f.endswith(".h5")] if os.path.isdir(parts) else []


@pytest.mark.slow  # subprocesses: ~10 s on an idle 2-core machine, ~40 s under load
def test_kill_and_resume_equals_uninterrupted_run(folder, reference, tmp_path):
    out = str(tmp_path / "resumed.h5")
    parts = out + ".parts"
    # slowed down (the plain model sleeps) so that the kill lands mid-run; SIGKILL to every process
    proc = subprocess.Popen(_torchrun(2, ["explain", folder[0], "--out", out, "--batch-images", "2"] + ARGS),
                            env=_env(MASKED_OPS_TEST_DELAY="0.1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while len(_batch_files(parts)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        _kill_tree(proc.pid)  # torchrun starts each worker in a session of its own: kill them one by one
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert not os.path.exists(out)  # no output that looks complete
    done = len(_batch_files(parts))
    assert 3 <= done
    with open(os.path.join(parts, ".r00001-deadbeef.h5.0badf00d.tmp"), "wb") as f:
        f.write(b"\x89HDF half a file")  # what a kill during a write leaves behind
    # resumed on ONE process: the shards of the killed run are not tied to their ranks
    prev = torch.get_num_threads()
    try:
        assert cli.main(["explain", folder[0], "--out", out, "--batch-images", "2"] + ARGS) == 0
    finally:
        torch.set_num_threads(prev)
    _same_file(reference, out)
    with h5py.File(out) as f:
        total = f["path"].shape[0] + f["errors/path"].shape[0]
        assert 0 < f["run"].attrs["images_computed"] <= total - 2 * done
    assert not os.path.exists(parts)


# ----------------------------------------------------------------------------- reruns and bad input
def test_rerun_skips_and_refuses_other_settings(folder, reference, tmp_path, capsys):
    import shutil

    root = str(tmp_path / "photos")
    shutil.copytree(folder[0], root)
    out = str(tmp_path / "o.h5")
    prev = torch.get_num_threads()
    try:
        assert cli.main(["explain", root, "--out", out] + ARGS) == 0
        mtime = os.stat(out).st_mtime_ns
        capsys.readouterr()
        assert cli.main(["explain", root, "--out", out] + ARGS) == 0  # nothing new: file untouched
        assert "processed 0" in capsys.readouterr().out and os.stat(out).st_mtime_ns == mtime
        shutil.copy(os.path.join(root, "1", "astronaut.png"), os.path.join(root, "5", "new.png"))
        assert cli.main(["explain", root, "--out", out] + ARGS) == 0  # one new image: only it is computed
        assert "processed 1, 19 were finished before" in capsys.readouterr().out
        r = H.read_h5(out)
        i, j = r["path"].index("1/astronaut.png"), r["path"].index("5/new.png")
        assert np.array_equal(r["attributions"]["layer"][i], r["attributions"]["layer"][j])
        assert r["label"][j] == 5
        other = [a if a != "16" else "20" for a in ARGS]
        assert cli.main(["explain", root, "--out", out] + other) == 2
        assert "other settings (differs in: samples)" in capsys.readouterr().err
        assert cli.main(["explain", root, "--out", out, "--fresh"] + other) == 0
        assert H.read_h5(out)["attrs"]["samples"] == 20
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("argv,message", [
    (["--out", "{tmp}/x.png"], "HDF5 file"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/missing/x.h5"], "does not exist"),
    (["--out", "{tmp}/x.h5", "--device", "cuda:7"], "cuda"),
])
def test_bad_input_fails_cleanly(argv, message, folder, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["explain", folder[0], "--model", MODEL, "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("masked-ops: error:") and message in err
    assert os.listdir(tmp_path) == []


def _row(path, value, hw=(6, 5)):
    seg = (np.arange(hw[0] * hw[1]).reshape(hw) % 3).astype(np.uint16)
    return H.Row(path, value % 4, "c", (40, 50), value, np.asarray([value, 1, 2]), np.asarray([0.5, 0.3, 0.2], np.float32),
                 seg, {"a": np.full(hw, value, np.float32), "b": -np.full(hw, value, np.float32)})


def test_merge_sorts_deduplicates_and_streams_in_blocks(tmp_path):
    """Sources interleaved as ranks write them, a duplicate, an error explained on a later attempt."""
    paths = [f"d/{i:03d}.png" for i in range(23)]
    srcs = []
    for r in range(3):  # three ranks, strided shards, checkpoint files of 4 rows
        mine = paths[r::3]
        for b in range(0, len(mine), 4):
            srcs.append(str(tmp_path / f"r{r}-{b}.h5"))
            errs = [("d/999.png", "broken")] if r == 0 and b == 0 else []
            H.write_file(srcs[-1], [_row(p, int(p[2:5])) for p in mine[b:b + 4]], errs, strategies=["a", "b"],
                         attrs={})
    srcs.append(str(tmp_path / "again.h5"))  # a row written twice, and the error one readable after all
    H.write_file(srcs[-1], [_row(paths[7], 7), _row("d/999.png", 999)], strategies=["a", "b"], attrs={})
    out = str(tmp_path / "out.h5")
    assert H.merge(srcs[::-1], out, attrs={"x": 1}, run={}, strategies=["a", "b"], model_classes=["m"],
                   block=5) == (24, 0)
    r = H.read_h5(out)
    assert r["path"] == paths + ["d/999.png"] and r["errors"] == []
    values = [int(p[2:5]) for p in r["path"]]
    assert r["target"].tolist() == values and r["label"].tolist() == [v % 4 for v in values]
    assert [m[0, 0] for m in r["attributions"]["a"]] == values
    assert [m[0, 0] for m in r["attributions"]["b"]] == [-v for v in values]
    assert r["topk_class"][:, 0].tolist() == values and r["attrs"]["x"] == 1
    with pytest.raises(ValueError, match="strategies"):
        H.merge(srcs[:1], out, attrs={}, run={}, strategies=["a"], model_classes=[])


def test_write_h5_one_image(tmp_path):
    from masked_ops.explain import explain_occlusion, get_strategy
    from masked_ops.models import top_classes

    model, info = tiny_model()
    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top = top_classes(model((x[None] - 0.45) / 0.225)[0], info, k=3)
    exps = [explain_occlusion(get_strategy(s, model), x, targets=[top[0][0]], n_segments=16) for s in ("layer", "grey")]
    path = str(tmp_path / "one.h5")
    H.write_h5(path, exps, image="x.png", top=top, settings=dict(model="tiny"), model_classes=info.class_names)
    r = H.read_h5(path)
    assert r["path"] == ["x.png"] and r["target"].tolist() == [top[0][0]] and r["label"].tolist() == [-1]
    for e in exps:
        assert np.array_equal(r["attributions"][e.strategy][0], e.heatmap(0).numpy())
    assert r["attrs"]["method"] == "occlusion" and r["attrs"]["model"] == "tiny"
    assert sorted(os.listdir(tmp_path)) == ["one.h5"]
    with pytest.raises(ValueError, match=".h5"):
        H.write_h5(str(tmp_path / "one.npz"), exps, image="x.png", top=top)
