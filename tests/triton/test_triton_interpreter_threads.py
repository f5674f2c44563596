"""Two Python threads launching crossent's Triton kernels at once (on CPU: triton's
interpreter, switched on for this folder by conftest.py; with CUDA: the compiled kernels).

triton's interpreter is not thread-safe (while an interpreted kernel runs it rebinds
triton.language's functions; crossent rebinds its kernels' globals), so crossent
serialises interpreted launches behind one lock
(``crossent.torch._triton.kernels.launching``); compiled launches take no lock and run
concurrently. Either way both threads must get torch's loss and gradient (torch on the
same device, in float32), each for its own data, options and shapes. A hang fails the
test (timeout)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.torch._triton import kernels  # noqa: E402

pytestmark = pytest.mark.timeout(120)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter

# per thread: (rows, classes, options); different shapes and options, so the two threads
# run differently specialised kernels at the same time
CASES = {
    1: (6, 37, {"label_smoothing": 0.1}),
    2: (9, 300, {"reduction": "sum"}),
}


def _data(seed: int):
    rows, classes, _ = CASES[seed]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g) * 4
    t = torch.randint(0, classes, (rows,), generator=g)
    t[0] = -100  # an ignored row
    return z.to(DEVICE), t.to(DEVICE)


def _loss_and_grad(fn, seed: int, **extra):
    z, t = _data(seed)
    z.requires_grad_()
    loss = fn(z, t, **CASES[seed][2], **extra)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def _in_two_threads(work) -> dict[int, object]:
    """``work(seed)`` in two threads started together (a barrier), three times each; the
    last result of each, or the first exception re-raised here."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=60)

    def run(seed: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[seed] = work(seed)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in CASES]
    for th in threads:
        th.start()
    for th in threads:
        th.join(100)
    assert not any(th.is_alive() for th in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def _features(rows: int, classes: int, seed: int):
    """The linear head's x and W (leaves on the device) for thread ``seed``."""
    g = torch.Generator().manual_seed(10 + seed)
    x = torch.randn(rows, 5, generator=g)
    w = torch.randn(classes, 5, generator=g)
    return x.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()


def test_cross_entropy_in_two_threads_matches_torch():
    # conftest: the interpreter runs the kernels on CPU; with CUDA they are compiled
    assert kernels.interpreting() == (DEVICE == "cpu")
    got = _in_two_threads(
        lambda seed: _loss_and_grad(xt.cross_entropy, seed, backend="triton"))
    for seed in CASES:
        want_loss, want_grad = _loss_and_grad(F.cross_entropy, seed)
        loss, grad = got[seed]
        torch.testing.assert_close(loss, want_loss, msg=f"thread {seed}: loss")
        torch.testing.assert_close(grad, want_grad, msg=f"thread {seed}: gradient")


def test_linear_head_in_two_threads_matches_torch():
    """The chunked Triton linear head (several launches per call) in both threads."""
    def head(seed: int):
        z, t = _data(seed)
        x, w = _features(*z.shape, seed)
        opts = CASES[seed][2]
        loss = xt.linear_cross_entropy(x, w, t, chunk_size=4, backend="triton", **opts)
        return (loss.detach(), *torch.autograd.grad(loss, (x, w)))

    got = _in_two_threads(head)
    for seed in CASES:
        z, t = _data(seed)
        x, w = _features(*z.shape, seed)
        want = F.cross_entropy(x @ w.T, t, **CASES[seed][2])
        want_grads = torch.autograd.grad(want, (x, w))
        for name, a, b in zip(("loss", "dx", "dW"), got[seed], (want.detach(), *want_grads),
                              strict=True):
            torch.testing.assert_close(a, b, msg=f"thread {seed}: {name}")
