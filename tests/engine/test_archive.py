"""Archive templates (poe.engine.archive): the composer's files without torch.jit.save on the hot path."""

import hashlib
import io
import itertools
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from poe.engine.archive import ArchiveTemplate, TemplateError, probe_state
from poe.engine.compose import build, composed_state, plan
from poe.engine.export import EXTRA_FILE, ScriptCache, _swap_tensors, load_torchscript, script, to_torchscript_bytes
from poe.engine.pool import tensors_to_bytes


def export(cache, model, meta: dict) -> bytes:
    """TorchScript bytes of `model` with `meta` as poe.json, through the cache's archive template."""
    return export_state(cache, model.state_dict(), meta, lambda: model)


def export_state(cache, state: dict, meta: dict, make_model) -> bytes:
    """TorchScript bytes of the model whose state dict is `state` (`make_model` builds one like it)."""
    template = cache.template(state, make_model)
    return template.render(template.views(state), meta)



def _records(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None  # every CRC checks out
        return {i.filename: z.read(i) for i in z.infolist()}


@pytest.mark.parametrize("fused", [True, False])
def test_rendered_archive_holds_what_jit_save_writes(random_pool, fused):
    """Every record (code, data.pkl, storages) is byte for byte torch.jit.save's for the same state."""
    x = torch.rand(3, 1, 28, 28)
    for classes in (["Sandal", "Bag"], ["Shirt", "Coat", "Ankle boot"], ["Trouser", "Dress", "Sneaker", "Bag"]):
        p = plan(random_pool, classes)
        state = composed_state(random_pool, p, fused)
        model = build(random_pool, p, fused).eval()
        scripted = script(model)
        meta = {"classes": list(p.class_names)}
        reference = _records(to_torchscript_bytes(scripted, meta))
        probe = probe_state(state)
        _swap_tensors(scripted, probe)
        template = ArchiveTemplate.from_archive(to_torchscript_bytes(scripted, {}), probe, EXTRA_FILE)
        rendered = template.render(template.views(state), meta)
        got = _records(rendered)
        assert set(got) == set(reference)
        differ = [name for name in got if got[name] != reference[name]]
        assert all(name.endswith(".data/serialization_id") for name in differ), differ

        loaded, loaded_meta = load_torchscript(rendered)
        assert loaded_meta == meta
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        # The weights' hash without building the safetensors bytes, and data aligned as torch does.
        assert template.weights_sha256(template.views(state)) == hashlib.sha256(tensors_to_bytes(state)).hexdigest()
        with zipfile.ZipFile(io.BytesIO(rendered)) as z:
            for info in z.infolist():
                name_len, extra_len = struct.unpack_from("<HH", rendered, info.header_offset + 26)
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_one_template_per_layout_and_none_for_new_class_sets_of_a_known_layout(random_pool):
    cache = ScriptCache(copies=1)
    tasks = list(random_pool.experts)
    pairs = list(itertools.combinations(tasks, 2))
    for a, b in pairs:  # same number of experts and classes kept: one layout for all of them
        p = plan(random_pool, tasks=[a, b])
        export_state(cache, composed_state(random_pool, p, True), {}, lambda p=p: build(random_pool, p, True))
    layouts = {tuple(len(random_pool.hierarchy.tasks[t]) for t in pair) for pair in pairs}
    sums = {sum(sizes) for sizes in layouts}
    assert cache.templated == len(sums)  # fused: the layout depends on the total of kept classes only
    assert cache.scripted == 1


def test_tensors_to_bytes_is_safetensors_byte_for_byte():
    g = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.randn(3, 4, generator=g), "a.count": torch.tensor(7),
             "c.ids": torch.arange(5), "d.half": torch.randn(2, generator=g).half(), "e.flag": torch.tensor([True])}
    assert tensors_to_bytes(state) == st_save(dict(sorted(state.items())))
    state["f.bf16"] = torch.randn(4, generator=g).bfloat16()  # numpy has no bfloat16: the slow path
    assert tensors_to_bytes(state) == st_save(dict(sorted(state.items())))


class _WithFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("flag", torch.tensor([True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.flag


def test_layouts_that_cannot_be_probed_fall_back_to_jit_save():
    model = _WithFlag()
    with pytest.raises(TemplateError):
        probe_state(model.state_dict())
    cache = ScriptCache(copies=1)
    data = export(cache, model, {"k": 1})
    loaded, meta = load_torchscript(data)
    x = torch.rand(4, 3)
    assert meta == {"k": 1} and torch.equal(loaded(x), model(x))
    other = _WithFlag()  # the same layout again: the fallback serves it, and scripting is not repeated
    assert torch.equal(load_torchscript(export(cache, other, {}))[0](x), other(x))
    assert cache.scripted == 1 and EXTRA_FILE == "poe.json"


def test_templates_are_bounded_by_bytes(random_pool):
    seen = []
    cache = ScriptCache(copies=1, max_template_bytes=1, on_bytes=seen.append)  # room for one template only
    x = torch.rand(2, 1, 28, 28)
    for classes in (["Sandal", "Bag"], ["Sandal", "Sneaker", "Bag"], ["Sandal", "Bag"]):
        p = plan(random_pool, classes)
        data = export_state(cache, composed_state(random_pool, p, True), {}, lambda p=p: build(random_pool, p, True))
        assert torch.allclose(load_torchscript(data)[0](x), build(random_pool, p, True).eval()(x), atol=1e-6)
    assert cache.templated == 3  # the first layout was pushed out by the second, so it was saved again
    assert cache.full and len(cache._templates) == 1 and seen[-1] == cache.template_bytes > 0


def test_a_failed_scripting_gives_its_copy_back(random_pool):
    """With one copy per structure, a scripting that fails must not leave later callers waiting."""
    import threading

    cache = ScriptCache(copies=1)
    p = plan(random_pool, tasks=list(random_pool.experts)[:2])
    state = composed_state(random_pool, p, True)

    def broken():
        raise RuntimeError("cannot build")

    with pytest.raises(RuntimeError, match="cannot build"):
        cache.template(state, broken)
    done = []
    worker = threading.Thread(target=lambda: done.append(cache.template(state, lambda: build(random_pool, p, True))),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done, "the second caller waited for a copy that was never made"
    assert cache.scripted == 2



def test_pools_that_differ_only_in_stem_stride_get_their_own_templates(random_pool):
    """The stride is a constant in the scripted code, not a tensor: a template must not be shared."""
    import dataclasses

    from poe.engine.export import serialize

    strided = dataclasses.replace(random_pool, library_config=dataclasses.replace(random_pool.library_config,
                                                                                  stem_stride=2))
    cache = ScriptCache(copies=1)
    x = torch.rand(3, *random_pool.input_shape)
    for pool in (random_pool, strided):
        p = plan(pool, tasks=list(pool.experts)[:2])
        data, _ = serialize(pool, p, composed_state(pool, p, True), "fused", "torchscript", cache)
        model, _ = load_torchscript(data)
        assert torch.allclose(model(x), build(pool, p, True).eval()(x), atol=1e-5)
    assert cache.templated == 2
