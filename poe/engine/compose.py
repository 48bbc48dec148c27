"""Train-free consolidation: library + chosen experts -> one classifier over the requested classes.

`plan` turns a request (class names or ids, and/or primitive tasks) into the experts to use and
which of their output columns to keep; `build` makes the network. Two executions of the same
function exist:

- reference: the pool's modules as they are; each expert runs on the shared feature map, one
  after another;
- fused (the default), built for inference: batch norms folded into multiply-adds and into the
  convolutions they follow, every convolution channels-last, and the n experts stacked into one
  block-diagonal network (grouped convolutions, one block-diagonal linear layer whose rows are
  already in output order), so every expert layer is a single call for all experts.

Either way the output columns are the requested classes in sorted class-id order. Classes a
chosen expert covers but the request did not name are removed by slicing that expert's last
linear layer; nothing is trained.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poe.engine.errors import InvalidArgument, NotFound, field_error
from poe.engine.limits import ascii_id
from poe.engine.nets import Head, Library
from poe.engine.pool import Pool


@dataclass(frozen=True)
class Plan:
    pool: str  # name@version
    class_ids: tuple[int, ...]  # output order (sorted)
    class_names: tuple[str, ...]
    tasks: tuple[str, ...]  # experts used, hierarchy order
    keep: tuple[tuple[int, ...], ...]  # per expert: kept output rows (positions in its fc)

    @property
    def num_experts(self) -> int:
        return len(self.tasks)


def check_request(classes, tasks) -> None:
    """InvalidArgument (field `classes`) for a request that names neither a class nor a task."""
    if not classes and not tasks:
        raise field_error("classes", "empty request: name at least one class or primitive task")


def plan(pool: Pool, classes: list[str | int] | None = None, tasks: list[str] | None = None) -> Plan:
    """Resolve a request against the pool. Naming a task asks for all of its classes; a class is
    named (case-insensitive) or given by id, an int or a string of digits.

    The one resolution of a request: ComposeModel, the registry's ResolveClasses and `poe compose`
    all answer through it. Only `pool.ref`, `pool.hierarchy` and the experts' `class_ids` are read."""
    classes = [int(c) if isinstance(c, str) and ascii_id(c) is not None else c for c in classes or []]
    tasks = list(tasks or [])
    check_request(classes, tasks)
    h = pool.hierarchy
    try:
        ids = set(h.resolve_classes(classes)) if classes else set()
    except InvalidArgument as err:
        raise field_error("classes", str(err)) from None
    try:
        named_tasks = h.resolve_tasks(tasks) if tasks else []
    except InvalidArgument as err:
        raise field_error("tasks", str(err)) from None
    for t in named_tasks:
        ids.update(h.tasks[t])
    chosen = h.covering_tasks(ids)
    missing = [t for t in chosen if t not in pool.experts]
    if missing:
        raise NotFound(f"pool {pool.ref} has no expert for primitive task(s): {', '.join(missing)}")
    keep = tuple(tuple(i for i, c in enumerate(pool.experts[t].class_ids) if c in ids) for t in chosen)
    ordered = tuple(sorted(ids))
    return Plan(pool.ref, ordered, tuple(h.classes[i] for i in ordered), tuple(chosen), keep)


def slice_head(head: Head, rows: tuple[int, ...]) -> Head:
    """A copy of `head` whose linear layer keeps only the given output rows."""
    idx = torch.tensor(rows, dtype=torch.long)
    fc = nn.Linear(head.fc.in_features, len(rows))
    with torch.no_grad():
        fc.weight.copy_(head.fc.weight.index_select(0, idx))
        fc.bias.copy_(head.fc.bias.index_select(0, idx))
    out = Head.__new__(Head)
    nn.Module.__init__(out)
    out.group, out.bn, out.fc = head.group, head.bn, fc
    return out.eval()


class ReferenceExperts(nn.Module):
    """Experts one after another on the shared feature map; logits concatenated."""

    def __init__(self, heads: list[Head]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(features) for h in self.heads], dim=1)


class ComposedModel(nn.Module):
    """library -> experts -> columns reordered to sorted class ids. Takes pixels in [0, 1].

    The reference execution: the pool's own modules, unchanged."""

    def __init__(self, library: Library, experts: nn.Module, order: torch.Tensor):
        super().__init__()
        self.library = library
        self.experts = experts
        self.register_buffer("order", order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] in [0, 1] -> logits [N, K], one column per requested class
        return self.experts(self.library(x)).index_select(1, self.order)


# -- fused execution -------------------------------------------------------------------------------

BN_EPS = 1e-5  # nn.BatchNorm2d's default, which every network of poe.engine.nets uses


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
          groups: int) -> torch.Tensor:
    """A convolution whose weight is stored [out, kh, kw, in]: permuted back to [out, in, kh, kw]
    it is a channels-last view, so the convolution runs channels-last and no weight is copied per
    call."""
    return F.conv2d(x, weight.permute(0, 3, 1, 2), bias, stride, padding, 1, groups)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A module's own copy of a state tensor, with standard strides (so that saving the module
    writes what the composer's templates write)."""
    return t.clone(memory_format=torch.contiguous_format)


class FoldedBlock(nn.Module):
    """`groups` pre-activation blocks (nets.PreActBlock) side by side, for inference.

    BN1 stands before a ReLU, so it cannot move into a convolution: it is one multiply-add with
    per-channel `bn_scale`, `bn_shift`. BN2 directly follows conv1, so it is folded into conv1's
    weight and a bias. The convolutions are grouped (block-diagonal): one call for all groups.

    `shared_input`: every group reads the same map (the experts' first block reads the library's
    features). Each expert has its own BN1 there, and ReLU(BN1_i(x)) differs between experts, so
    one dense convolution of x cannot replace their first convolutions. What is shared is x: one
    broadcast multiply-add writes the n normalised copies straight into the grouped convolution's
    channels-last input, with no replicated map to normalise afterwards.
    """

    __constants__ = ["stride", "groups", "shared_input"]  # constants of the scripted code, as in nn.Conv2d

    def __init__(self, bn_scale: torch.Tensor, bn_shift: torch.Tensor, conv1_weight: torch.Tensor,
                 conv1_bias: torch.Tensor, conv2_weight: torch.Tensor, shortcut_weight: torch.Tensor | None,
                 stride: int, groups: int, shared_input: bool):
        super().__init__()
        self.register_buffer("bn_scale", _own(bn_scale))  # [C, 1, 1]; shared input: [groups, C]
        self.register_buffer("bn_shift", _own(bn_shift))
        self.conv1_weight = nn.Parameter(_own(conv1_weight), requires_grad=False)
        self.conv1_bias = nn.Parameter(_own(conv1_bias), requires_grad=False)
        self.conv2_weight = nn.Parameter(_own(conv2_weight), requires_grad=False)
        self.shortcut_weight = (None if shortcut_weight is None
                                else nn.Parameter(_own(shortcut_weight), requires_grad=False))
        self.stride, self.groups, self.shared_input = stride, groups, shared_input

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, stride: int, groups: int,
                   shared_input: bool) -> FoldedBlock:
        shortcut = state.get(prefix + "shortcut_weight")
        return cls(state[prefix + "bn_scale"], state[prefix + "bn_shift"], state[prefix + "conv1_weight"],
                   state[prefix + "conv1_bias"], state[prefix + "conv2_weight"], shortcut, stride, groups,
                   shared_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            n, c, h, w = x.shape
            # x channels-last is [N, H, W, C] in memory: [N, H, W, 1, C] * [G, C] + [G, C] gives
            # [N, H, W, G, C], which is the grouped input [N, G*C, H, W] in channels-last memory.
            o = torch.addcmul(self.bn_shift, x.permute(0, 2, 3, 1).unsqueeze(3), self.bn_scale)
            o = torch.relu_(o).reshape(n, h, w, self.groups * c).permute(0, 3, 1, 2)
        else:
            o = torch.relu_(torch.addcmul(self.bn_shift, x, self.bn_scale))
        shortcut = self.shortcut_weight
        # Pre-activation: a projection shortcut reads the activated input.
        skip = x if shortcut is None else _conv(o, shortcut, None, self.stride, 0, self.groups)
        o = torch.relu_(_conv(o, self.conv1_weight, self.conv1_bias, self.stride, 1, self.groups))
        return _conv(o, self.conv2_weight, None, 1, 1, self.groups).add_(skip)


class FoldedLibrary(nn.Module):
    """The library for inference: the normalisation's division folded into the stem's weight,
    blocks as FoldedBlock, channels-last from the stem on."""

    __constants__ = ["stem_stride"]

    def __init__(self, mean: torch.Tensor, stem_weight: torch.Tensor, stem_stride: int, blocks: list[FoldedBlock]):
        super().__init__()
        self.register_buffer("mean", _own(mean))
        self.stem_weight = nn.Parameter(_own(stem_weight), requires_grad=False)
        self.stem_stride = stem_stride
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / std convolved with w is (x - mean) convolved with w / std, zero padding included.
        o = _conv(x - self.mean, self.stem_weight, None, self.stem_stride, 1, 1)
        return self.blocks(o.contiguous(memory_format=torch.channels_last))


class FusedExperts(nn.Module):
    """n experts executed as one block-diagonal network; same function as ReferenceExperts, with the
    output rows already in sorted class-id order."""

    def __init__(self, blocks: list[FoldedBlock], bn_scale: torch.Tensor, bn_shift: torch.Tensor,
                 fc_weight: torch.Tensor, fc_bias: torch.Tensor):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.register_buffer("bn_scale", _own(bn_scale))
        self.register_buffer("bn_shift", _own(bn_shift))
        self.fc = nn.Linear(fc_weight.shape[1], fc_weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(fc_weight)
            self.fc.bias.copy_(fc_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        o = torch.relu_(torch.addcmul(self.bn_shift, self.blocks(features), self.bn_scale))
        return self.fc(o.mean((2, 3)))


class FusedModel(nn.Module):
    """The fused execution: FoldedLibrary -> FusedExperts, whose linear layer already puts the
    columns in sorted class-id order. Takes pixels in [0, 1]."""

    def __init__(self, library: FoldedLibrary, experts: FusedExperts):
        super().__init__()
        self.library = library
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] in [0, 1] -> logits [N, K], one column per requested class
        return self.experts(self.library(x))


def _folded_bn(state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = x * scale + shift."""
    scale = state[prefix + "weight"] / torch.sqrt(state[prefix + "running_var"] + BN_EPS)
    return scale, state[prefix + "bias"] - state[prefix + "running_mean"] * scale


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] -> [out, kh, kw, in], what `_conv` takes, with the standard strides
    (`contiguous()` would keep a permuted view's strides wherever a dimension has size 1)."""
    return weight.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)


def _fold_network(state: dict[str, torch.Tensor], groups: tuple[str, ...], prefix: str) -> dict[str, torch.Tensor]:
    """One network's pre-activation blocks (those of `groups`, in order) as FoldedBlock tensors
    named `{prefix}blocks.{i}.*`; the library's normalisation and stem and an expert's last BN
    too, when the state has them."""
    out: dict[str, torch.Tensor] = {}
    index = 0
    for group in groups:
        for i in sorted({int(k.split(".")[1]) for k in state if k.startswith(group + ".")}):
            p, key = f"{group}.{i}.", f"{prefix}blocks.{index}."
            scale1, shift1 = _folded_bn(state, p + "bn1.")
            out[key + "bn_scale"], out[key + "bn_shift"] = scale1.view(-1, 1, 1), shift1.view(-1, 1, 1)
            scale2, out[key + "conv1_bias"] = _folded_bn(state, p + "bn2.")
            out[key + "conv1_weight"] = _channels_last(state[p + "conv1.weight"] * scale2.view(-1, 1, 1, 1))
            out[key + "conv2_weight"] = _channels_last(state[p + "conv2.weight"])
            if p + "shortcut.weight" in state:
                out[key + "shortcut_weight"] = _channels_last(state[p + "shortcut.weight"])
            index += 1
    if "stem.weight" in state:
        out[prefix + "mean"] = state["norm.mean"].clone()
        out[prefix + "stem_weight"] = _channels_last(state["stem.weight"] / state["norm.std"].view(1, -1, 1, 1))
    if "bn.weight" in state:
        scale, shift = _folded_bn(state, "bn.")
        out[prefix + "bn_scale"], out[prefix + "bn_shift"] = scale.view(-1, 1, 1), shift.view(-1, 1, 1)
    return out


class _FoldCache:
    """Folded tensors per source network, made once: the composer builds every fused state from
    the same few cached pool tensors, so folding is paid per expert and library, not per request.

    An entry is keyed by the identity of its source's tensors (pool tensors are never changed in
    place) and lives as long as the source's first block does."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, tuple[int, ...], dict[str, torch.Tensor]]] = {}

    def get(self, state: dict[str, torch.Tensor], groups: tuple[str, ...], prefix: str) -> dict[str, torch.Tensor]:
        """`_fold_network(state, groups, prefix)`; a state is always folded with the same arguments."""
        key = state[f"{groups[0]}.0.conv1.weight"]
        ident, sources = id(key), tuple(id(t) for t in state.values())
        hit = self._entries.get(ident)
        if hit is not None and hit[0]() is key and hit[1] == sources:
            return hit[2]
        folded = _fold_network(state, groups, prefix)
        entries = self._entries

        def forget(ref: weakref.ref, ident: int = ident) -> None:
            if entries.get(ident, (None,))[0] is ref:
                entries.pop(ident, None)

        entries[ident] = (weakref.ref(key, forget), sources, folded)  # one dict operation: thread-safe
        return folded

    def __len__(self) -> int:
        return len(self._entries)


_FOLDED = _FoldCache()
_LIBRARY_GROUPS = ("group1", "group2")
_EXPERT_GROUPS = ("group",)


def fold_ahead(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold a library's or an expert's tensors now (as the fused execution will), so that no
    request pays for it; returns the folded tensors (they live as long as `state`)."""
    groups, prefix = (_LIBRARY_GROUPS, "library.") if "stem.weight" in state else (_EXPERT_GROUPS, "")
    if f"{groups[0]}.0.conv1.weight" not in state:
        return {}  # not a network this execution folds (a request for it fails with its own message)
    return _FOLDED.get(state, groups, prefix)


def _check_fusable(experts: list) -> None:
    shapes = {(e.config.blocks, e.config.in_channels, e.config.width) for e in experts}
    if len(shapes) != 1:
        raise InvalidArgument("fused execution needs experts of one architecture (blocks, input, width)")


def _fused_state(pool: Pool, p: Plan) -> dict[str, torch.Tensor]:
    state = dict(_FOLDED.get(pool.library_state, _LIBRARY_GROUPS, "library."))
    experts = [pool.experts[t] for t in p.tasks]
    _check_fusable(experts)
    folded = [_FOLDED.get(e.state, _EXPERT_GROUPS, "") for e in experts]
    n = len(experts)
    for k in folded[0]:
        parts = [f[k] for f in folded]
        if k.startswith("blocks.0.bn_") and n > 1:  # the first block reads one shared map: [n, C]
            state[f"experts.{k}"] = torch.stack([t.view(-1) for t in parts])
        else:
            state[f"experts.{k}"] = torch.cat(parts)
    # One block-diagonal linear layer; row j answers class p.class_ids[j] (no reordering after it).
    width = experts[0].state["fc.weight"].shape[1]
    row_of = {c: j for j, c in enumerate(p.class_ids)}
    weight = torch.zeros(len(p.class_ids), width * n)
    bias = torch.zeros(len(p.class_ids))
    for i, (e, kept) in enumerate(zip(experts, p.keep, strict=True)):
        src = torch.tensor(kept, dtype=torch.long)
        dst = torch.tensor([row_of[e.class_ids[r]] for r in kept], dtype=torch.long)
        weight[dst, i * width:(i + 1) * width] = e.state["fc.weight"].index_select(0, src)
        bias[dst] = e.state["fc.bias"].index_select(0, src)
    state["experts.fc.weight"] = weight
    state["experts.fc.bias"] = bias
    return state


def _build_fused(pool: Pool, p: Plan) -> FusedModel:
    state = _fused_state(pool, p)
    # Strides come from the pool's own modules, so both executions follow poe.engine.nets.
    lib = pool.library()
    lib_strides = [b.conv1.stride[0] for b in [*lib.group1, *lib.group2]]
    library = FoldedLibrary(state["library.mean"], state["library.stem_weight"], lib.stem.stride[0],
                            [FoldedBlock.from_state(state, f"library.blocks.{i}.", s, 1, False)
                             for i, s in enumerate(lib_strides)])
    n = p.num_experts
    head = pool.experts[p.tasks[0]].module()
    blocks = [FoldedBlock.from_state(state, f"experts.blocks.{i}.", b.conv1.stride[0], n, i == 0 and n > 1)
              for i, b in enumerate(head.group)]
    experts = FusedExperts(blocks, state["experts.bn_scale"], state["experts.bn_shift"],
                           state["experts.fc.weight"], state["experts.fc.bias"])
    return FusedModel(library, experts)


def build(pool: Pool, p: Plan, fused: bool = True) -> ComposedModel | FusedModel:
    if fused:
        model: nn.Module = _build_fused(pool, p)
    else:
        heads = [slice_head(pool.experts[t].module(), rows) for t, rows in zip(p.tasks, p.keep, strict=True)]
        # Column j of the concatenated logits is class concat_ids[j]; reorder to sorted ids.
        concat_ids = [pool.experts[t].class_ids[r] for t, rows in zip(p.tasks, p.keep, strict=True) for r in rows]
        order = torch.tensor([concat_ids.index(c) for c in p.class_ids], dtype=torch.long)
        model = ComposedModel(pool.library(), ReferenceExperts(heads), order)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


def composed_state(pool: Pool, p: Plan, fused: bool = True) -> dict[str, torch.Tensor]:
    """The state dict `build(pool, p, fused)` would have, made from the pool's tensors directly.

    This is the composer's hot path: slicing and concatenating a few dozen small tensors (each
    library's and expert's folded tensors are made once, `_FoldCache`) costs 0.1-0.2 ms, where
    constructing the modules costs 10-20 ms. Combined with a scripted template of the same
    structure (`poe.engine.export.ScriptCache`) it gives the same model file as `build`. The
    tensors may be the pool's or the cache's own: never change them in place.
    """
    if fused:
        return _fused_state(pool, p)
    state = {f"library.{k}": v for k, v in pool.library_state.items()}
    experts = [pool.experts[t] for t in p.tasks]
    concat_ids = [e.class_ids[r] for e, kept in zip(experts, p.keep, strict=True) for r in kept]
    state["order"] = torch.tensor([concat_ids.index(c) for c in p.class_ids], dtype=torch.long)
    for j, (e, kept) in enumerate(zip(experts, p.keep, strict=True)):
        rows = torch.tensor(kept, dtype=torch.long)
        for k, v in e.state.items():
            if k in ("fc.weight", "fc.bias"):
                v = v.index_select(0, rows)
            state[f"experts.heads.{j}.{k}"] = v
    return state


def plan_params(pool: Pool, p: Plan, library_params: int | None = None,
                expert_params: dict[str, int] | None = None) -> int:
    """Parameters of the composed model: library + chosen experts with their sliced linear layers,
    as the pool stores them (the reference execution's count; the fused layout folds batch norms
    and stores zero off-diagonal blocks, neither counted).

    The counts come from the pool's tensors, or from `library_params` / `expert_params` (task ->
    parameters of the whole expert) when the caller knows them without the tensors.
    """
    total = pool.library_params if library_params is None else library_params
    for task, kept in zip(p.tasks, p.keep, strict=True):
        e = pool.experts[task]
        full = e.params if expert_params is None else expert_params[task]
        total += full - (e.config.num_classes - len(kept)) * (e.config.width + 1)
    return total


def compose(pool: Pool, classes: list[str | int] | None = None, tasks: list[str] | None = None,
            fused: bool = True) -> tuple[Plan, ComposedModel | FusedModel]:
    p = plan(pool, classes, tasks)
    return p, build(pool, p, fused)
