"""pt2 (torch.export) and ONNX model files: templates equal fresh exports, loading by content,
a fresh process without this project, and the CLI (compose --format, eval, predict)."""

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from poe.engine.compose import build, composed_state, plan
from poe.engine.errors import InvalidArgument
from poe.engine.export import ScriptCache, load_model, model_format, serialize, to_pt2_bytes
from poe.engine.onnx_export import INPUT_NAME, OUTPUT_NAME, to_onnx_bytes
from poe.engine.pool import load as load_pool
from poe.engine.pool import save as save_pool

SHIPPED_POOL = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"
POE = [sys.executable, "-m", "poe.cli.main"]


def _records(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None  # every CRC checks out
        return {i.filename: z.read(i) for i in z.infolist()}


@pytest.fixture(scope="module")
def files(random_pool):
    """One composition (fused) in every format, through the composer's path (`serialize`)."""
    cache = ScriptCache(copies=1)
    p = plan(random_pool, ["Sandal", "Bag"])
    state = composed_state(random_pool, p, True)
    out = {fmt: serialize(random_pool, p, state, "fused", fmt, cache)
           for fmt in ("torchscript", "pt2", "onnx", "safetensors")}
    return p, cache, out


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_templated_file_equals_a_fresh_export(random_pool, files, fmt):
    """A second class set of the same layout (2 experts, 2 classes) is written into the first one's
    template, and its file computes what a fresh export of the same state computes; pt2's records
    and ONNX's bytes are even the same as the fresh export's."""
    _, cache, out = files
    made = cache.templated
    p = plan(random_pool, ["Shirt", "Coat"])  # tops + warm-layers: the layout of Sandal + Bag
    data, meta = serialize(random_pool, p, composed_state(random_pool, p, True), "fused", fmt, cache)
    assert cache.templated == made  # no export for a layout seen before
    model = build(random_pool, p, True)
    if fmt == "pt2":
        fresh = to_pt2_bytes(model, meta, random_pool.input_shape)
        got, want = _records(data), _records(fresh)
        assert set(got) == set(want)
        assert [n for n in got if got[n] != want[n]] == ["archive/.data/serialization_id"]
    else:
        assert data == to_onnx_bytes(model, meta, random_pool.input_shape)
    loaded, loaded_meta, detected = load_model(data)
    assert detected == fmt and loaded_meta == meta and meta["classes"] == ["Coat", "Shirt"]
    for batch in (1, 7):  # the batch dimension is dynamic
        x = torch.rand(batch, 1, 28, 28)
        y = loaded(x)
        assert y.shape == (batch, 2)
        assert torch.allclose(y, model(x), atol=1e-5)


def test_onnx_file_contract(files):
    import onnx
    import onnxruntime

    p, _, out = files
    data, meta = out["onnx"]
    proto = onnx.load_model_from_string(data)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert json.loads({e.key: e.value for e in proto.metadata_props}["poe.json"]) == meta
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["poe.json"])["class_ids"] == list(p.class_ids)


def test_load_model_tells_formats_apart(files, tmp_path):
    _, _, out = files
    x = torch.rand(2, 1, 28, 28)
    ys = {}
    for fmt in ("torchscript", "pt2", "onnx"):
        path = tmp_path / f"m.{fmt}"
        path.write_bytes(out[fmt][0])
        model, meta, detected = load_model(path)
        assert detected == fmt and meta == out[fmt][1]
        ys[fmt] = model(x)
    assert torch.allclose(ys["pt2"], ys["torchscript"], atol=1e-5)
    assert torch.allclose(ys["onnx"], ys["torchscript"], atol=1e-4)
    assert model_format(out["safetensors"][0]) == "safetensors"
    with pytest.raises(InvalidArgument, match="weights only"):
        load_model(out["safetensors"][0])
    for junk in (b"not a model", b"PK\x03\x04broken zip", b""):
        with pytest.raises(InvalidArgument, match="not a model file"):
            load_model(junk)
    with pytest.raises(InvalidArgument, match="no such file"):
        load_model(tmp_path / "missing.onnx")


def test_fresh_process_without_the_project_reaches_torchscript_accuracy(tmp_path, fmnist_test):
    """pt2 through torch.export.load and ONNX through onnxruntime, in `python -I` with this project
    not imported: the shipped pool's model scores what its TorchScript file scores on real images."""
    pool = load_pool(SHIPPED_POOL, with_oracle=False)
    p = plan(pool, ["Sandal", "Sneaker", "Bag", "Ankle boot"])
    cache = ScriptCache(copies=1)
    state = composed_state(pool, p, True)
    for fmt, name in (("torchscript", "model.pt"), ("pt2", "model.pt2"), ("onnx", "model.onnx")):
        (tmp_path / name).write_bytes(serialize(pool, p, state, "fused", fmt, cache)[0])
    ids = torch.tensor(p.class_ids)
    mask = torch.isin(fmnist_test.labels, ids)
    keep = torch.nonzero(mask).flatten()[::8]  # every 8th test image of these classes: 500 real images
    np.save(tmp_path / "x.npy", fmnist_test.images[keep].float().div(255).numpy())
    np.save(tmp_path / "y.npy", torch.searchsorted(ids, fmnist_test.labels[keep]).numpy())
    script = textwrap.dedent("""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        import numpy as np, onnxruntime, torch
        d = sys.argv[1]
        x, y = np.load(d + "/x.npy"), np.load(d + "/y.npy")
        out, metas = {}, {}
        extra = {"poe.json": ""}
        out["torchscript"] = torch.jit.load(d + "/model.pt", _extra_files=extra)(torch.from_numpy(x)).numpy()
        metas["torchscript"] = json.loads(extra["poe.json"])
        extra = {"poe.json": ""}
        program = torch.export.load(d + "/model.pt2", extra_files=extra)
        out["pt2"] = program.module()(torch.from_numpy(x)).detach().numpy()
        metas["pt2"] = json.loads(extra["poe.json"])
        session = onnxruntime.InferenceSession(d + "/model.onnx", providers=["CPUExecutionProvider"])
        out["onnx"] = session.run(["logits"], {"images": x})[0]
        metas["onnx"] = json.loads(session.get_modelmeta().custom_metadata_map["poe.json"])
        assert not any(m == "poe" or m.startswith(("poe.", "poe_services")) for m in sys.modules), "imported poe"
        print(json.dumps({"accuracy": {k: float((v.argmax(1) == y).mean()) for k, v in out.items()},
                          "max_diff": {k: float(np.abs(v - out["torchscript"]).max()) for k, v in out.items()},
                          "classes": {k: m["classes"] for k, m in metas.items()}}))
    """)
    # -I: isolated mode, so neither the working directory nor PYTHON* variables put poe on the path.
    res = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    acc = result["accuracy"]
    assert acc["torchscript"] > 0.9  # a real model on real images
    assert abs(acc["pt2"] - acc["torchscript"]) <= 0.001 and abs(acc["onnx"] - acc["torchscript"]) <= 0.001, acc
    assert result["max_diff"]["pt2"] < 1e-4 and result["max_diff"]["onnx"] < 1e-4, result["max_diff"]
    assert all(c == list(p.class_names) for c in result["classes"].values())


# -- the command line ------------------------------------------------------------------------------

def run(*args, cwd=None):
    env = {**os.environ, "POE_NO_PROGRESS": "1"}
    return subprocess.run([*POE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def pool_dir(random_pool, tmp_path_factory):
    return save_pool(random_pool, tmp_path_factory.mktemp("pool") / "test-pool")


def test_cli_compose_onnx_with_a_triton_entry_then_eval(pool_dir, tmp_path):
    out = run("compose", "--local", str(pool_dir), "--classes", "Sandal,Sneaker,Bag", "--format", "onnx",
              "-o", str(tmp_path / "m.onnx"), "--triton-repo", str(tmp_path / "repo"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["format"] == "onnx" and (tmp_path / "m.onnx").stat().st_size == summary["bytes"]
    entry = tmp_path / "repo" / "m"  # named after the output file
    assert summary["triton_entry"] == str(entry)
    assert (entry / "1" / "model.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert (entry / "labels.txt").read_text().splitlines() == ["Sandal", "Sneaker", "Bag"]
    assert 'name: "m"' in (entry / "config.pbtxt").read_text()  # parsed as Triton's ModelConfig in test_triton.py

    ev = run("eval", str(tmp_path / "m.onnx"), "--pool", str(pool_dir), "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["format"] == "onnx" and result["images"] == 3000 and 0 <= result["accuracy"] <= 1
    assert set(result["per_class"]) == {"Sandal", "Sneaker", "Bag"}


def test_cli_predict_reads_pt2(files, tmp_path, fmnist_test):
    from PIL import Image

    _, _, out = files
    (tmp_path / "m.pt2").write_bytes(out["pt2"][0])
    sandal = int(torch.nonzero(fmnist_test.labels == 5)[0])
    Image.fromarray(fmnist_test.images[sandal, 0].numpy()).save(tmp_path / "sandal.png")
    pr = run("predict", str(tmp_path / "m.pt2"), str(tmp_path / "sandal.png"), "--json")
    assert pr.returncode == 0, pr.stderr
    row = json.loads(pr.stdout)[0]
    assert row["class"] in ("Sandal", "Bag") and 0.5 <= row["probability"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--format", "pt2"], "onnx or torchscript"),
    (["--format", "onnx", "--triton-name", "../up"], "triton model name"),
])
def test_cli_refuses_a_triton_entry_before_composing(pool_dir, tmp_path, extra, message):
    out = run("compose", "--local", str(pool_dir), "--classes", "Bag", *extra, "--triton-repo",
              str(tmp_path / "repo"), "-o", str(tmp_path / "m.model"))
    assert out.returncode != 0 and not (tmp_path / "repo").exists() and not (tmp_path / "m.model").exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poe: error:") and message in lines[0], out.stderr


def test_every_layer_names_the_same_formats():
    from poe import contract
    from poe.cli.main import _SUFFIXES
    from poe.engine.export import FORMATS

    assert tuple(_SUFFIXES) == FORMATS == tuple(contract.FORMATS)
