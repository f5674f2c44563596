"""``inplace_backward=True``: where the gradient is written (``_rules.may_overwrite``).

The rule: the kernel writes the gradient into the caller's memory only when that memory
belongs to a non-leaf tensor (an activation: ``h * 1.0``, a matmul's output, a view of
one). For a leaf, or a view of a leaf, it writes a fresh buffer: the logits stay intact,
``.grad`` is a tensor of its own (never the leaf's storage: a refilled leaf,
``zero_grad(set_to_none=False)`` or an optimizer step would change both silently), and
autograd adopts that buffer as ``.grad`` without a copy (it copies a returned gradient
that anything else still references: a hidden ``N x C`` allocation and pass).

The probe for a copy: a hook on the Function's node records the data pointers of the
gradients backward returned (pointers only: a kept tensor would itself force the copy),
compared with ``.grad`` afterwards. Reference everywhere: torch's ``F.cross_entropy`` on a
float64 copy. The adversarial cases (optimizers, refilled buffers, double backward, ops
that saved the logits, threads, other Functions) are in
``test_inplace_adoption_adversarial.py``; the Triton kernel's counterpart is
``tests/triton/test_triton_inplace_adoption.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grad_probes import assert_grad_close as _close
from grad_probes import assert_written_in_place
from grad_probes import torch_grad as _torch_grad

import crossent.torch as xt

# 600 x 1000 logits: above the small-batch kernel (which ignores inplace_backward), so
# "auto" takes the row-block kernel, as "rowblock" does (asserted on the node's name)
N, C = 600, 1000
FUSED = "_CrossEntropyFunctionBackward"


def _data(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, C, generator=g) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100
    return z, y


def _fused_node(loss):
    node = loss.grad_fn
    while not isinstance(node, torch.autograd.function.BackwardCFunction):
        node = node.next_functions[0][0]  # past a view or cast to the Function's node
    assert type(node).__name__ == FUSED, "not the row-block kernel: the test is moot"
    return node


def _returned_ptrs(loss):
    """Data pointers of the gradients the row-block Function's backward returns."""
    seen: list[list[int | None]] = []
    _fused_node(loss).register_hook(
        lambda gi, go: seen.append([None if g is None else g.data_ptr() for g in gi]))
    return seen


def _storage(t):
    return t.untyped_storage().data_ptr()


# ---------------------------------------------------------------- leaves: a fresh buffer


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leaf_stays_intact_and_its_fresh_grad_is_adopted(backend, dtype, reduction):
    z, y = _data(0, dtype)
    a = z.clone().requires_grad_()
    holders = [a, {"logits": a}]  # other references to the leaf change nothing
    loss = xt.cross_entropy(a, y, reduction=reduction, inplace_backward=True, backend=backend)
    seen = _returned_ptrs(loss)
    go = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(dtype) \
        if reduction == "none" else None
    loss.backward(go)
    assert torch.equal(a.detach(), z), "a leaf's logits were overwritten"
    assert _storage(a.grad) != _storage(a), ".grad shares the leaf's storage"
    assert seen[0][0] == a.grad.data_ptr(), "the gradient was copied into .grad"
    _close(a.grad, _torch_grad(z, y, reduction, go), dtype)
    assert holders[0] is a


@pytest.mark.parametrize("view", ["rows", "reshape"])
def test_view_of_a_leaf_stays_intact(view):
    """``leaf[2:590]`` and ``leaf.view(...)``: the leaf's memory, so a fresh buffer too.
    Through a reshape view, ``.grad`` is a view of the returned buffer (no copy)."""
    g = torch.Generator().manual_seed(2)
    if view == "rows":
        z = torch.randn(N + 10, C, generator=g)
        rows = slice(2, N + 2)
    else:
        z = torch.randn(N * C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    leaf = z.clone().requires_grad_()
    logits = leaf[rows] if view == "rows" else leaf.view(N, C)
    loss = xt.cross_entropy(logits, y, inplace_backward=True, backend="rowblock")
    seen = _returned_ptrs(loss)
    loss.backward()
    assert torch.equal(leaf.detach(), z), "a view of a leaf was overwritten"
    assert _storage(leaf.grad) != _storage(leaf)
    ref = z.double().requires_grad_()
    F.cross_entropy(ref[rows] if view == "rows" else ref.view(N, C), y).backward()
    _close(leaf.grad, ref.grad)
    if view == "reshape":
        assert _storage(leaf.grad) == seen[0][0], "the gradient was copied into .grad"


def test_existing_grad_accumulates_into_its_own_buffer():
    """A second micro-batch: the leaf already has a ``.grad``; it is added to in place
    (torch's rule), the leaf untouched."""
    z, y = _data(3)
    a = z.clone().requires_grad_()
    before = torch.full_like(z, 0.25)
    a.grad = before.clone()
    kept = a.grad
    xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock").backward()
    assert a.grad is kept and torch.equal(a.detach(), z)
    _close(a.grad, before.double() + _torch_grad(z, y))


def test_tensor_hook_sees_and_replaces_the_gradient():
    z, y = _data(4)
    a = z.clone().requires_grad_()
    seen = []
    a.register_hook(lambda g: seen.append(g.clone()) or g * 2)
    xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock").backward()
    want = _torch_grad(z, y)
    _close(seen[0], want)
    _close(a.grad, 2 * want)
    assert torch.equal(a.detach(), z)


# ---------------------------------------------------------------- activations: in place


def _activation(kind: str, seed: int):
    """(producer leaves, logits built from them, the same in float64 for torch)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "matmul":  # the head's matmul output: x @ W.T
        x0, w0 = torch.randn(N, 16, generator=g), torch.randn(C, 16, generator=g) * 0.5
        leaves = [x0.clone().requires_grad_(), w0.clone().requires_grad_()]
        refs = [x0.double().requires_grad_(), w0.double().requires_grad_()]
        return leaves, leaves[0] @ leaves[1].t(), refs, refs[0] @ refs[1].t()
    h0 = torch.randn(N + (kind != "mul"), C, generator=g) * 2
    h, ref = h0.clone().requires_grad_(), h0.double().requires_grad_()
    if kind == "mul":  # a copy made by an op: h * 1.0 (saves nothing of its output)
        return [h], h * 1.0, [ref], ref * 1.0
    return [h], (h * 2)[1:], [ref], (ref * 2)[1:]  # a view of a non-leaf


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("kind", ["mul", "matmul", "view_of_activation"])
def test_activation_is_overwritten_by_torchs_gradient(backend, kind):
    """The activation's memory holds torch's gradient of the logits after backward (no
    ``N x C`` buffer), and the producer's gradients (``h.grad``, dx, dW) are torch's."""
    leaves, logits, refs, ref_logits = _activation(kind, 5)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(6))
    y[::7] = -100
    loss = xt.cross_entropy(logits, y, inplace_backward=True, backend=backend)
    _fused_node(loss)
    assert_written_in_place(loss, logits, ref_logits, y, leaves, refs, kind)


def test_activation_is_not_overwritten_where_torch_cannot_say_whether_hooks_are_active(
        monkeypatch):
    """``may_overwrite`` asks torch (a private query) whether saved-tensor hooks are in
    force; a torch without that query gets the safe answer: not in place."""
    from crossent.torch._rules import may_overwrite

    h = torch.randn(3, 4, requires_grad=True)
    assert may_overwrite(h * 2)
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert not may_overwrite(h * 2)


def test_saved_inputs_without_storage_are_left_to_torchs_check():
    """A saved input whose address cannot be read (no storage) is checked by torch
    alone: no error of crossent's own."""
    from crossent.torch._rules import _forward_state

    class NoStorage:
        _version = 0

        def data_ptr(self):
            raise RuntimeError("Cannot access data pointer of Tensor that doesn't have "
                               "storage")

    assert _forward_state(None) is None
    assert _forward_state(NoStorage()) is None  # type: ignore[arg-type]
    t = torch.zeros(2)
    assert _forward_state(t) == (t.data_ptr(), t._version)
