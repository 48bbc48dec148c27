import json
import subprocess
import sys
import textwrap

import torch

from poe.engine.compose import compose
from poe.engine.export import load_torchscript, metadata, to_torchscript_bytes, weights_sha256
from poe.engine.pool import load as load_pool
from poe.engine.pool import save as save_pool


def export(cache, model, meta: dict) -> bytes:
    """TorchScript bytes of `model` with `meta` as poe.json, through the cache's archive template."""
    return export_state(cache, model.state_dict(), meta, lambda: model)


def export_state(cache, state: dict, meta: dict, make_model) -> bytes:
    """TorchScript bytes of the model whose state dict is `state` (`make_model` builds one like it)."""
    template = cache.template(state, make_model)
    return template.render(template.views(state), meta)



def test_pool_round_trip_and_sha256_check(random_pool, tmp_path):
    save_pool(random_pool, tmp_path / "pool")
    loaded = load_pool(tmp_path / "pool")
    assert loaded.ref == random_pool.ref and list(loaded.experts) == list(random_pool.experts)
    for k, v in random_pool.library_state.items():
        assert torch.equal(loaded.library_state[k], v)
    # Flip one byte in an expert's weights: loading must refuse it.
    path = tmp_path / "pool" / "experts" / "bags.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    import pytest

    from poe.engine.errors import DataLoss

    with pytest.raises(DataLoss, match="sha256 mismatch"):
        load_pool(tmp_path / "pool")


def test_exported_file_follows_the_contract(random_pool, tmp_path):
    p, model = compose(random_pool, classes=["Sandal", "Sneaker", "Bag"])
    data = to_torchscript_bytes(model, metadata(random_pool, p, model, "fused"))
    m, meta = load_torchscript(data)
    assert meta["classes"] == ["Sandal", "Sneaker", "Bag"] and meta["class_ids"] == [5, 7, 8]
    assert meta["input"] == {"shape": [1, 28, 28], "range": [0, 1], "dtype": "float32"}
    assert meta["pool"] == "test-pool@1" and meta["experts"] == ["test-pool@1/footwear", "test-pool@1/bags"]
    reference = compose(random_pool, classes=["Sandal", "Sneaker", "Bag"], fused=False)[1]
    assert meta["params"] == sum(x.numel() for x in reference.parameters())
    assert meta["sha256"] == weights_sha256(model) and len(meta["sha256"]) == 64


def test_exported_file_runs_in_a_fresh_process_with_only_torch(random_pool, tmp_path):
    p, model = compose(random_pool, classes=["Coat", "Trouser", "Ankle boot"])
    (tmp_path / "model.pt").write_bytes(to_torchscript_bytes(model, metadata(random_pool, p, model, "fused")))
    x = torch.rand(5, 1, 28, 28)
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent("""
        import json, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch
        extra = {"poe.json": ""}
        m = torch.jit.load(sys.argv[1] + "/model.pt", _extra_files=extra)
        io = torch.load(sys.argv[1] + "/io.pt", weights_only=True)
        y = m(io["x"])
        assert not any(name == "poe" or name.startswith("poe.") for name in sys.modules), "imported poe"
        print(json.dumps({"max_diff": float((y - io["y"]).abs().max()), "meta": json.loads(extra["poe.json"])}))
    """)
    # -I: isolated mode, so neither the working directory nor PYTHON* variables put poe on the path.
    out = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["max_diff"] < 1e-6
    assert result["meta"]["classes"] == ["Trouser", "Coat", "Ankle boot"]


def test_reference_and_fused_files_agree(random_pool):
    x = torch.rand(3, 1, 28, 28)
    outs = []
    for fused in (False, True):
        p, model = compose(random_pool, tasks=["tops", "bags"], fused=fused)
        m, _ = load_torchscript(to_torchscript_bytes(model, metadata(random_pool, p, model, "x")))
        outs.append(m(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_load_rejects_non_model(tmp_path):
    import pytest

    from poe.engine.errors import InvalidArgument

    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InvalidArgument, match="not a TorchScript"):
        load_torchscript(tmp_path / "junk.pt")


def test_script_cache_reuses_templates_and_stays_exact(random_pool):
    """One scripted template per structure (number of experts); every composition, whatever
    classes it keeps, exports to a file that computes exactly its own function."""
    import itertools

    from poe.engine.compose import build as build_model
    from poe.engine.compose import plan
    from poe.engine.export import ScriptCache

    cache = ScriptCache(copies=1)
    x = torch.rand(4, 1, 28, 28)
    tasks = list(random_pool.experts)
    requests = [{"tasks": list(c)} for n in range(1, 6) for c in itertools.combinations(tasks, n)]
    requests += [{"classes": ["Sandal", "Bag"]}, {"classes": ["Shirt", "Coat", "Ankle boot"]}, {"classes": [3]}]
    for req in requests:
        p = plan(random_pool, **req)
        model = build_model(random_pool, p)
        m, meta = load_torchscript(export(cache, model, metadata(random_pool, p, model, "fused")))
        assert meta["class_ids"] == list(p.class_ids)
        assert torch.allclose(m(x), model(x), atol=1e-6), req
    assert cache.scripted == 5  # one per number of experts


def test_script_cache_is_safe_under_concurrency(random_pool):
    from concurrent.futures import ThreadPoolExecutor

    from poe.engine.compose import build as build_model
    from poe.engine.compose import plan
    from poe.engine.export import ScriptCache

    cache = ScriptCache(copies=2)
    x = torch.rand(2, 1, 28, 28)
    queries = [["Sandal", "Bag"], ["Trouser", "Coat"], ["Shirt", "Sneaker"], ["Dress", "Pullover"]] * 4

    def one(classes):
        p = plan(random_pool, classes)
        model = build_model(random_pool, p)
        m, meta = load_torchscript(export(cache, model, metadata(random_pool, p, model, "fused")))
        return torch.allclose(m(x), model(x), atol=1e-6) and meta["classes"] == list(p.class_names)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, queries))
    assert cache.scripted <= 2


def test_script_cache_from_state_matches_built_model(random_pool):
    from poe.engine.compose import build as build_model
    from poe.engine.compose import composed_state, plan
    from poe.engine.export import ScriptCache

    cache = ScriptCache(copies=1)
    x = torch.rand(3, 1, 28, 28)
    for fused in (True, False):
        for classes in (["Sandal", "Bag"], ["Shirt", "Trouser"], ["Coat", "Dress", "Sneaker", "Bag", "Shirt"]):
            p = plan(random_pool, classes)
            model = build_model(random_pool, p, fused)
            data = export_state(cache, composed_state(random_pool, p, fused), {"classes": list(p.class_names)},
                                      lambda model=model: model)
            m, meta = load_torchscript(data)
            assert torch.allclose(m(x), model(x), atol=1e-6)
    assert cache.scripted == 4  # {fused, reference} x {2, 5 experts}; reused across class sets
