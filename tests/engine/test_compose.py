import itertools

import pytest
import torch
import torch.nn.functional as F

from poe.engine.compose import build, compose, plan
from poe.engine.errors import InvalidArgument, NotFound
from poe.engine.nets import count_params

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
    _, model = compose(random_pool, tasks=["footwear"])
    expert = random_pool.experts["footwear"].module()
    assert count_params(model) == count_params(random_pool.library()) + count_params(expert)


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
        from poe.engine.compose import composed_state

        p = plan(random_pool, **req)
        expected = build(random_pool, p, fused).state_dict()
        got = composed_state(random_pool, p, fused)
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
