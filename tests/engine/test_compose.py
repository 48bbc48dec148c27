import itertools

import pytest
import torch
import torch.nn.functional as F

from poe.engine import compose as compose_mod
from poe.engine.compose import _FOLDED, FoldedBlock, build, compose, composed_state, fold_ahead, plan, plan_params
from poe.engine.errors import InvalidArgument, NotFound
from poe.engine.export import quiet_jit
from poe.engine.nets import ExpertConfig, count_params, make_expert

TASKS = ["tops", "warm-layers", "lower-body-and-dresses", "footwear", "bags"]


@pytest.fixture(scope="module")
def x():
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tasks", [c for n in range(1, 6) for c in itertools.combinations(TASKS, n)],
                         ids=lambda t: "+".join(t))
def test_fused_equals_reference_for_every_subset(random_pool, x, tasks):
    p = plan(random_pool, tasks=list(tasks))
    ref = build(random_pool, p, fused=False)
    fused = build(random_pool, p, fused=True)
    a, b = ref(x), fused(x)
    assert a.shape == (6, len(p.class_ids))
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_fused_equals_reference_with_sliced_classes(random_pool, x):
    p = plan(random_pool, classes=["Sandal", "Bag", "Shirt", "Coat"])
    assert p.tasks == ("tops", "warm-layers", "footwear", "bags")
    assert torch.allclose(build(random_pool, p, False)(x), build(random_pool, p, True)(x), atol=1e-5)


def test_composed_model_equals_hand_computation(random_pool, x):
    """library -> each expert -> keep requested rows -> columns in sorted class-id order."""
    p, model = compose(random_pool, classes=["Ankle boot", "T-shirt/top", "Sandal"])
    assert p.class_ids == (0, 5, 9) and p.class_names == ("T-shirt/top", "Sandal", "Ankle boot")
    lib = random_pool.library()
    feats = lib(x)
    by_class = {}
    for task in p.tasks:
        e = random_pool.experts[task]
        head = e.module()
        # Head by hand: group, BN, ReLU, average pool, then the linear layer row by row.
        h = F.relu(head.bn(head.group(feats))).mean(dim=(2, 3))
        for row, cls in enumerate(e.class_ids):
            by_class[cls] = h @ head.fc.weight[row] + head.fc.bias[row]
    expected = torch.stack([by_class[c] for c in p.class_ids], dim=1)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_request_by_task_and_class_union(random_pool):
    p = plan(random_pool, classes=["Bag"], tasks=["footwear"])
    assert p.class_ids == (5, 7, 8, 9) and p.tasks == ("footwear", "bags")


def test_slicing_removes_unrequested_classes_only_from_the_output(random_pool, x):
    full = build(random_pool, plan(random_pool, tasks=["footwear"]))
    one = build(random_pool, plan(random_pool, classes=["Sneaker"]))
    assert one(x).shape == (6, 1)
    assert torch.allclose(one(x)[:, 0], full(x)[:, 1], atol=1e-5)  # Sneaker is column 1 of 5, 7, 9


def test_one_task_model_is_library_plus_one_expert(random_pool):
    p, model = compose(random_pool, tasks=["footwear"], fused=False)
    expert = random_pool.experts["footwear"].module()
    library = random_pool.library()
    assert count_params(model) == count_params(library) + count_params(expert) == plan_params(random_pool, p)


@pytest.mark.parametrize("request_kwargs, error, message", [
    ({}, InvalidArgument, "empty request"),
    ({"classes": ["Sandal", "Boots", "Hat"]}, InvalidArgument, "'Boots', 'Hat'"),
    ({"tasks": ["hats"]}, InvalidArgument, "unknown primitive tasks: 'hats'"),
])
def test_bad_requests(random_pool, request_kwargs, error, message):
    with pytest.raises(error, match=message):
        plan(random_pool, **request_kwargs)


def test_missing_expert_is_not_found(random_pool):
    import dataclasses

    partial = dataclasses.replace(random_pool, experts={k: v for k, v in random_pool.experts.items() if k != "bags"})
    with pytest.raises(NotFound, match="no expert for primitive task"):
        plan(partial, classes=["Bag"])


def test_composed_model_has_no_trainable_state(random_pool):
    _, model = compose(random_pool, classes=["Coat"])
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_composed_state_equals_built_model(random_pool, fused):
    """The composer's hot path (tensors only) gives exactly the state of the built model."""
    for req in ({"tasks": TASKS}, {"classes": ["Sandal", "Bag", "Shirt"]}, {"classes": ["Coat"]},
                {"tasks": ["tops", "footwear"]}):
        p = plan(random_pool, **req)
        expected = build(random_pool, p, fused).state_dict()
        got = composed_state(random_pool, p, fused)
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


# -- the fused execution's structure -------------------------------------------------------------

def _convolutions(model: torch.nn.Module) -> int:
    """aten::conv2d calls in the scripted model's forward, submodules inlined."""
    with quiet_jit():
        graph = torch.jit.script(model).inlined_graph
    return sum(1 for node in graph.nodes() if node.kind() == "aten::conv2d")


def test_fused_expert_layers_are_one_call_for_all_experts(random_pool):
    """One convolution per layer whatever the number of experts, no batch norm left (folded),
    and no column reordering after the linear layer."""
    counts = {}
    for n in (1, 2, 5):
        model = build(random_pool, plan(random_pool, tasks=TASKS[:n]), fused=True)
        counts[n] = _convolutions(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert "order" not in model.state_dict()
    reference = {n: _convolutions(build(random_pool, plan(random_pool, tasks=TASKS[:n]), fused=False)) for n in (1, 5)}
    assert counts[1] == counts[2] == counts[5] == reference[1] < reference[5]


def test_fused_first_block_reads_the_shared_map_once_per_expert(random_pool):
    """The experts' first block normalises the library's map once per expert into one grouped input;
    every later block is grouped and reads its own channels."""
    model = build(random_pool, plan(random_pool, tasks=TASKS), fused=True)
    first, *rest = model.experts.blocks
    assert isinstance(first, FoldedBlock) and first.shared_input and first.groups == 5
    assert first.bn_scale.shape == (5, random_pool.library_config.channels[2])
    assert all(not b.shared_input and b.groups == 5 for b in rest)
    assert all(b.groups == 1 and not b.shared_input for b in model.library.blocks)


@pytest.mark.parametrize("batch", [1, 2, 33])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_equals_reference_for_any_batch_and_memory_format(random_pool, batch, memory_format):
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)).contiguous(
        memory_format=memory_format)
    for tasks in (["bags"], ["tops", "footwear"], TASKS):
        p = plan(random_pool, tasks=tasks)
        with torch.inference_mode():
            a, b = build(random_pool, p, fused=False)(x), build(random_pool, p, fused=True)(x)
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_fused_library_equals_the_pools_library(random_pool, x):
    model = build(random_pool, plan(random_pool, tasks=["bags"]), fused=True)
    with torch.inference_mode():
        assert torch.allclose(model.library(x), random_pool.library()(x), atol=1e-5)


def test_folded_tensors_follow_the_pools_tensors(random_pool):
    """Folding is cached per source network, keyed by its tensors: new tensors for an expert give
    a new fold, and the cache forgets a pool whose tensors are gone."""
    import dataclasses
    import gc

    def copied(state):
        return {k: v.clone() for k, v in state.items()}

    pool = dataclasses.replace(random_pool, library_state=copied(random_pool.library_state),
                               experts={t: dataclasses.replace(e, state=copied(e.state))
                                        for t, e in random_pool.experts.items()})
    p = plan(pool, tasks=["tops", "bags"])
    first = composed_state(pool, p, True)
    keys = [pool.library_state["group1.0.conv1.weight"], pool.experts["tops"].state["group.0.conv1.weight"],
            pool.experts["bags"].state["group.0.conv1.weight"]]  # what an entry is keyed by
    bags = pool.experts["bags"]
    changed = copied(bags.state)
    changed["bn.bias"] += 1.0
    other = dataclasses.replace(pool, experts={**pool.experts, "bags": dataclasses.replace(bags, state=changed)})
    second = composed_state(other, p, True)
    assert not torch.equal(first["experts.bn_shift"], second["experts.bn_shift"])
    assert torch.equal(second["experts.bn_shift"], build(other, p, True).state_dict()["experts.bn_shift"])
    keys.append(changed["group.0.conv1.weight"])  # a new fold for the changed expert
    refs = {id(k): _FOLDED._entries[id(k)][0] for k in keys}
    assert all(ref() is k for ref, k in zip(refs.values(), keys, strict=True))
    del pool, other, bags, changed, first, second, keys
    gc.collect()
    # Only this test's entries are checked: other tests' entries may come and go meanwhile.
    assert all(ref() is None and _FOLDED._entries.get(i, (None,))[0] is not ref for i, ref in refs.items())


def test_folded_ahead_networks_are_not_folded_again_by_a_request(random_pool, monkeypatch):
    """The composer folds each library and expert when it fetches them (`fold_ahead`): a fused
    state made afterwards folds nothing."""
    import dataclasses

    pool = dataclasses.replace(random_pool, library_state={k: v.clone() for k, v in random_pool.library_state.items()},
                               experts={t: dataclasses.replace(e, state={k: v.clone() for k, v in e.state.items()})
                                        for t, e in random_pool.experts.items()})
    assert "library.stem_weight" in fold_ahead(pool.library_state)
    assert all("bn_scale" in fold_ahead(e.state) for e in pool.experts.values())
    assert fold_ahead({"fc.weight": torch.zeros(2, 2)}) == {}  # nothing to fold
    folds = []
    monkeypatch.setattr(compose_mod, "_fold_network", lambda *a: folds.append(a))
    state = composed_state(pool, plan(pool, tasks=list(pool.experts)), True)
    assert folds == [] and "experts.bn_scale" in state


def test_fused_execution_refuses_experts_of_different_architectures(random_pool, x):
    import dataclasses

    config = ExpertConfig(random_pool.library_config.channels[2], 12, 1, 1)
    bags = dataclasses.replace(random_pool.experts["bags"], config=config, state=make_expert(config).state_dict())
    pool = dataclasses.replace(random_pool, experts={**random_pool.experts, "bags": bags})
    p = plan(pool, tasks=["tops", "bags"])
    with pytest.raises(InvalidArgument, match="one architecture"):
        build(pool, p, fused=True)
    with pytest.raises(InvalidArgument, match="one architecture"):
        composed_state(pool, p, fused=True)
    assert build(pool, p, fused=False)(x).shape == (6, 3)


def test_fused_equals_reference_for_colour_input_strided_stem_and_deeper_groups(random_pool):
    """Other library shapes than the shipped pool's: 3 input channels with their own mean and std
    (folded into the stem), a stem of stride 2 and two blocks per group (WRN-16), width 2."""
    import dataclasses

    from poe.engine.nets import WideResNet, WRNConfig
    from poe.engine.pool import Expert, library_state_from_student

    def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
        g = torch.Generator().manual_seed(seed)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
        return module

    cfg = WRNConfig(depth=16, width=2, in_channels=3, stem_stride=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    student = randomized(WideResNet(cfg), 1)
    experts = {}
    for i, (task, ids) in enumerate(random_pool.hierarchy.tasks.items()):
        config = ExpertConfig(student.library.out_channels, 8, cfg.blocks_per_group, len(ids))
        experts[task] = Expert(task, ids, config, randomized(make_expert(config), 10 + i).state_dict())
    pool = dataclasses.replace(random_pool, library_config=cfg, library_state=library_state_from_student(student),
                               experts=experts, oracle_config=None, oracle_state=None,
                               info={**random_pool.info, "input_shape": [3, 32, 32]})
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for tasks in (["footwear"], ["tops", "footwear", "bags"]):
        p = plan(pool, tasks=tasks)
        fused = build(pool, p, fused=True)
        assert len(fused.library.blocks) == 4 and len(fused.experts.blocks) == 2
        with torch.inference_mode():
            a, b = build(pool, p, fused=False)(x), fused(x)
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
