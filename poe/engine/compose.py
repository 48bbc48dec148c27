"""Train-free consolidation: library + chosen experts -> one classifier over the requested classes.

`plan` turns a request (class names or ids, and/or primitive tasks) into the experts to use and
which of their output columns to keep; `build` makes the network. Two executions of the same
function exist:

- reference: each expert runs on the shared feature map, one after another;
- fused: the n experts are stacked into one block-diagonal network (grouped convolutions, one
  BatchNorm over all their channels, one block-diagonal linear layer), so every layer is a
  single call for all experts.

Either way the output columns are the requested classes in sorted class-id order. Classes a
chosen expert covers but the request did not name are removed by slicing that expert's last
linear layer; nothing is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poe.engine.errors import InvalidArgument, NotFound, field_error
from poe.engine.nets import Head, Library, PreActBlock
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
    classes = [int(c) if isinstance(c, str) and c.strip().isdigit() else c for c in classes or []]
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


def _cat_bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(sum(b.num_features for b in bns), eps=bns[0].eps)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(out, name).copy_(torch.cat([getattr(b, name) for b in bns]))
    return out.eval()


def _grouped_conv(convs: list[nn.Conv2d], shared_input: bool) -> nn.Conv2d:
    """Stack n convolutions into one. With a shared input the weights are simply concatenated
    along the output axis; otherwise each reads its own slice of the input (groups = n)."""
    c = convs[0]
    n = len(convs)
    groups = 1 if shared_input else n
    in_ch = c.in_channels if shared_input else c.in_channels * n
    out = nn.Conv2d(in_ch, c.out_channels * n, c.kernel_size, c.stride, c.padding, bias=False, groups=groups)
    with torch.no_grad():
        out.weight.copy_(torch.cat([k.weight for k in convs]))
    return out


class FusedBlock(nn.Module):
    """n pre-activation blocks as one: BN over n*C channels, grouped convolutions."""

    def __init__(self, blocks: list[PreActBlock], replicate_input: bool):
        super().__init__()
        self.n = len(blocks)
        # The first block of the experts reads the library's shared map; each expert has its own
        # BN on it, so the input is replicated n times and each copy normalised separately.
        self.replicate_input = replicate_input
        self.bn1 = _cat_bn([b.bn1 for b in blocks])
        self.conv1 = _grouped_conv([b.conv1 for b in blocks], shared_input=False)
        self.bn2 = _cat_bn([b.bn2 for b in blocks])
        self.conv2 = _grouped_conv([b.conv2 for b in blocks], shared_input=False)
        has_shortcut = blocks[0].shortcut is not None
        self.shortcut = _grouped_conv([b.shortcut for b in blocks], shared_input=False) if has_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.replicate_input:
            x = x.repeat(1, self.n, 1, 1)
        o = F.relu(self.bn1(x))
        shortcut = self.shortcut
        skip = x if shortcut is None else shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        return self.conv2(o) + skip


class FusedExperts(nn.Module):
    """n experts executed as one block-diagonal network; same function as ReferenceExperts."""

    def __init__(self, heads: list[Head]):
        super().__init__()
        if not heads:
            raise InvalidArgument("no experts to fuse")
        shapes = {(len(h.group), h.group[0].conv1.in_channels, h.bn.num_features) for h in heads}
        if len(shapes) != 1:
            raise InvalidArgument("fused execution needs experts of one architecture (blocks, input, width)")
        n_blocks = len(heads[0].group)
        self.blocks = nn.Sequential(*[FusedBlock([h.group[i] for h in heads], replicate_input=(i == 0))
                                      for i in range(n_blocks)])
        self.bn = _cat_bn([h.bn for h in heads])
        width = heads[0].bn.num_features
        total = sum(h.fc.out_features for h in heads)
        self.fc = nn.Linear(width * len(heads), total)
        with torch.no_grad():
            self.fc.weight.zero_()
            row = 0
            for i, h in enumerate(heads):
                k = h.fc.out_features
                self.fc.weight[row:row + k, i * width:(i + 1) * width] = h.fc.weight
                self.fc.bias[row:row + k] = h.fc.bias
                row += k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.blocks(features)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


class ComposedModel(nn.Module):
    """library -> experts -> columns reordered to sorted class ids. Takes pixels in [0, 1]."""

    def __init__(self, library: Library, experts: nn.Module, order: torch.Tensor):
        super().__init__()
        self.library = library
        self.experts = experts
        self.register_buffer("order", order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] in [0, 1] -> logits [N, K], one column per requested class
        return self.experts(self.library(x)).index_select(1, self.order)


def build(pool: Pool, p: Plan, fused: bool = True) -> ComposedModel:
    heads = [slice_head(pool.experts[t].module(), rows) for t, rows in zip(p.tasks, p.keep, strict=True)]
    # Column j of the concatenated logits is class concat_ids[j]; reorder to sorted ids.
    concat_ids = [pool.experts[t].class_ids[r] for t, rows in zip(p.tasks, p.keep, strict=True) for r in rows]
    order = torch.tensor([concat_ids.index(c) for c in p.class_ids], dtype=torch.long)
    experts = FusedExperts(heads) if fused else ReferenceExperts(heads)
    model = ComposedModel(pool.library(), experts, order)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


def composed_state(pool: Pool, p: Plan, fused: bool = True) -> dict[str, torch.Tensor]:
    """The state dict `build(pool, p, fused)` would have, made from the pool's tensors directly.

    This is the composer's hot path: concatenating a few dozen small tensors costs well under a
    millisecond, where constructing the modules costs 10-20 ms. Combined with a scripted template
    of the same structure (`poe.engine.export.ScriptCache`) it gives the same model file as `build`.
    """
    state = {f"library.{k}": v for k, v in pool.library_state.items()}
    experts = [pool.experts[t] for t in p.tasks]
    rows = [torch.tensor(r, dtype=torch.long) for r in p.keep]
    concat_ids = [e.class_ids[r] for e, kept in zip(experts, p.keep, strict=True) for r in kept]
    state["order"] = torch.tensor([concat_ids.index(c) for c in p.class_ids], dtype=torch.long)
    if not fused:
        for j, (e, r) in enumerate(zip(experts, rows, strict=True)):
            for k, v in e.state.items():
                if k in ("fc.weight", "fc.bias"):
                    v = v.index_select(0, r)
                state[f"experts.heads.{j}.{k}"] = v
        return state
    first = experts[0].state
    for k in first:
        if not k.startswith(("group.", "bn.")):
            continue
        if k.endswith("num_batches_tracked"):
            state[f"experts.{_fused_name(k)}"] = first[k]
        else:
            state[f"experts.{_fused_name(k)}"] = torch.cat([e.state[k] for e in experts])
    width = first["fc.weight"].shape[1]
    total = sum(len(r) for r in rows)
    weight = torch.zeros(total, width * len(experts))
    row = 0
    for i, (e, r) in enumerate(zip(experts, rows, strict=True)):
        weight[row:row + len(r), i * width:(i + 1) * width] = e.state["fc.weight"].index_select(0, r)
        row += len(r)
    state["experts.fc.weight"] = weight
    state["experts.fc.bias"] = torch.cat([e.state["fc.bias"].index_select(0, r) for e, r in zip(experts, rows,
                                                                                               strict=True)])
    return state


def _fused_name(head_key: str) -> str:
    """`group.1.conv2.weight` (a Head's key) -> `blocks.1.conv2.weight` (FusedExperts' key)."""
    return "blocks." + head_key[len("group."):] if head_key.startswith("group.") else head_key


def plan_params(pool: Pool, p: Plan, library_params: int | None = None,
                expert_params: dict[str, int] | None = None) -> int:
    """Parameters of the composed model: library + chosen experts with their sliced linear layers
    (the same for both executions; the fused layout's zero off-diagonal blocks are not counted).

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
            fused: bool = True) -> tuple[Plan, ComposedModel]:
    p = plan(pool, classes, tasks)
    return p, build(pool, p, fused)
