"""Host offload of named activations inside a scanned layer stack.

A model marks the activations worth offloading with `offload_name(t, "name", self.offloaded)`
(an identity op the tracer keeps, emitted only for the names in the module's `offloaded` set,
which `activate` fills from outside). When `model.remat.offload_tensors` lists names, the scan
partitions each layer's forward/backward graph with `offload_partition`: the marked tensors
are the only activations kept for the backward pass, each sent to host memory in the forward
and brought back in the backward; everything else is recomputed from them and the weights.
The placement ops are torch_xla's; only TPU runtimes implement the host memory space, so the
rewriting enables this on TPU only (torchprime.rewriting says what happens elsewhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import fx, nn


@torch.library.custom_op("torchprime::offload_name", mutates_args=())
def _offload_name(t: torch.Tensor, name: str) -> torch.Tensor:
    return t.clone()  # a custom op may not return its input itself


@_offload_name.register_fake
def _(t: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(t)


_offload_name.register_autograd(lambda ctx, grad: (grad, None))


def offload_name(t: torch.Tensor, name: str, active: frozenset[str]) -> torch.Tensor:
    """Mark `t` as the activation called `name` when `name` is `active`: an identity, and
    free (not even an op) otherwise."""
    if name not in active:
        return t
    return _offload_name(t, name)


def activate(model: nn.Module, names: frozenset[str]) -> None:
    """Make the markers called `names` (and only those) visible to the partitioner: every
    module of `model` that marks activations (has an `offloaded` attribute) gets the set."""
    for module in model.modules():
        if hasattr(module, "offloaded"):
            module.offloaded = frozenset(names)


def marked_nodes(graph: fx.Graph, names: frozenset[str]) -> list[fx.Node]:
    """The marker nodes of `graph` whose name is one of `names`."""
    op = torch.ops.torchprime.offload_name.default
    return [
        n for n in graph.nodes if n.op == "call_function" and n.target is op and n.args[1] in names
    ]


@functools.cache
def offload_partition(names: frozenset[str], to_host: Callable, to_device: Callable) -> Callable:
    """A partition function for AOTAutograd (torch_xla's scan) that saves only the marked
    activations, on the host. Cached so the scan's trace cache (keyed by the partition
    function's identity) finds the same function every step."""

    def partition(joint_module: fx.GraphModule, _joint_inputs, *, num_fwd_outputs, **_):
        from torch._functorch.partitioners import _extract_fwd_bwd_modules, _is_primal

        graph = joint_module.graph
        primals = [n for n in graph.nodes if _is_primal(n)]
        marked = marked_nodes(graph, names)
        # Saving the primals (layer input, weights) costs nothing: they exist anyway. Saved
        # values the backward does not read are pruned by the extraction.
        fwd, bwd = _extract_fwd_bwd_modules(
            joint_module, primals + marked, [], num_fwd_outputs=num_fwd_outputs
        )
        offloaded = {n.name for n in marked}
        _route_saved(fwd, bwd, offloaded, to_host, to_device)
        return fwd, bwd

    return partition


def _route_saved(
    fwd: fx.GraphModule,
    bwd: fx.GraphModule,
    offloaded: set[str],
    to_host: Callable,
    to_device: Callable,
) -> None:
    """Send the forward's saved values named in `offloaded` to the host, and bring them back
    where the backward receives them."""
    output = next(n for n in fwd.graph.nodes if n.op == "output")
    outs = list(output.args[0])
    for i, node in enumerate(outs):
        if isinstance(node, fx.Node) and node.name in offloaded:
            with fwd.graph.inserting_before(output):
                outs[i] = fwd.graph.call_function(to_host, (node,))
    output.args = (tuple(outs),)
    placeholders = list(bwd.graph.find_nodes(op="placeholder"))
    for node in placeholders:
        if node.name not in offloaded:
            continue
        with bwd.graph.inserting_after(placeholders[-1]):
            back = bwd.graph.call_function(to_device, (node,))
        node.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
    fwd.recompile()
    bwd.recompile()
