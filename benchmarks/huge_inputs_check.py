"""Huge inputs on CPU: logits of more than 2**31 elements (review H101).

Checks that nothing in crossent's CPU paths wraps a 32-bit element offset: for each case the
loss (every row) and the gradient on chosen rows (the first, those around element 2**31, one
of which straddles it, and the last) against torch's ``F.cross_entropy`` in float64 computed
on row chunks. Needs ~10 GiB of memory and a few minutes on 2 cores; every group of cases
runs in its own process (its peak resident memory is reported per case).

    python benchmarks/huge_inputs_check.py            # all groups
    python benchmarks/huge_inputs_check.py bf16 head  # some of them

Prints one ``PASS``/``FAIL`` line per case (max errors, seconds, peak RSS of the case) and
exits 1 on a FAIL.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import torch.nn.functional as F

LIMIT = 1 << 31
CHUNK = 512


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 2**20
    return float("nan")


FAILED = []


def report(name: str, ok: bool, t0: float, **errors) -> None:
    errs = " ".join(f"{k}={v:.3g}" for k, v in errors.items())
    line = (f"{'PASS' if ok else 'FAIL'} {name}: {errs} time={time.perf_counter() - t0:.1f}s "
            f"peak_rss={_peak_gib():.2f}GiB")
    print(line, flush=True)
    if not ok:
        FAILED.append(name)


def check_rows(num_rows: int, num_classes: int) -> list[int]:
    """First rows, the rows around element 2**31 (one of them straddles it), last rows."""
    b = LIMIT // num_classes
    rows = {0, 1, b - 2, b - 1, b, b + 1, b + 2, num_rows - 3, num_rows - 2, num_rows - 1}
    return sorted(r for r in rows if 0 <= r < num_rows)


def reference(z: torch.Tensor, y: torch.Tensor, rows: list[int]):
    """float64 per-row losses (every row, chunked) and ``softmax - onehot`` at ``rows``."""
    n = z.shape[0]
    losses = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, CHUNK):
        zc = z[i:i + CHUNK].double()
        losses[i:i + CHUNK] = F.cross_entropy(zc, y[i:i + CHUNK], reduction="none")
        del zc
    idx = torch.tensor(rows)
    p = torch.softmax(z[idx].double(), 1)
    p[torch.arange(len(rows)), y[idx]] -= 1.0
    return losses, p


def grad_error(g: torch.Tensor, ref: torch.Tensor, unit) -> float:
    """Max over entries of |g - ref| / (|ref| + 1e-3 max_row |ref| + 1e-5 unit), ``unit`` the
    row's multiplier (1/N, |grad_output|): float32's ``p_y - 1`` of a confident row is exact
    to 6e-8 unit only. A wrong row or offset is O(1); bfloat16 rounding twice ~ 8e-3."""
    g = g.double()
    unit = torch.as_tensor(unit, dtype=torch.float64).reshape(-1, 1).abs()
    scale = ref.abs().amax(1, keepdim=True) * 1e-3 + 1e-5 * unit
    return float(((g - ref).abs() / (ref.abs() + scale)).max())


def run_cross_entropy(name, z, y, rows, ref_losses, ref_p, go, reduction, *, grad_tol,
                      loss_tol, hook=False, no_grad=False, **kw):
    import crossent.torch as xt

    _reset_peak()
    t0 = time.perf_counter()
    n = z.shape[0]
    idx = torch.tensor(rows)
    captured = {}
    if z.requires_grad and hook:  # an activation overwritten in place: read the rows here
        handle = z.register_hook(lambda g: captured.update(g=g[idx].clone()))
    with torch.no_grad() if no_grad else torch.enable_grad():
        loss = xt.cross_entropy(z, y, reduction=reduction, **kw)
    if reduction == "none":
        loss_err = float(((loss.double() - ref_losses).abs()
                          / (1.0 + ref_losses.abs())).max())
        tail = int(LIMIT // z.shape[1])
        tail_err = float(((loss[tail:].double() - ref_losses[tail:]).abs()
                          / (1.0 + ref_losses[tail:].abs())).max())
    else:
        loss_err = tail_err = abs(float(loss) - float(ref_losses.mean())) / (
            1.0 + abs(float(ref_losses.mean())))
    errs = {"loss_rel": loss_err, "loss_rel_past_2^31": tail_err}
    ok = loss_err <= loss_tol
    if z.requires_grad and loss.requires_grad:
        if reduction == "none":
            loss.backward(go)
            expect = ref_p * go[idx].double().unsqueeze(1)
        else:
            loss.backward()
            expect = ref_p / n
        g = captured["g"] if hook else z.grad[idx]
        if hook:
            handle.remove()
        unit = go[idx].double() if reduction == "none" else 1.0 / n
        errs["grad_rel"] = grad_error(g, expect, unit)
        ok = ok and errs["grad_rel"] <= grad_tol
        z.grad = None
    report(name, ok, t0, **errs)


# "none" with a gradient: its backward takes ~4x the bfloat16 logits' bytes more (measured at
# 1680 x 128256: +4.0x), ~17 GiB here next to the 4.3 GiB logits: OOM on a 24 GiB machine
NONE_NOTE = {"mean": "", "none": " (forward only: backward needs ~4x logits' bytes)"}


def group_bf16() -> None:
    """(16800, 128256) bfloat16: 2.15e9 logits; row 16743 straddles element 2**31."""
    import crossent.torch as xt

    torch.manual_seed(0)
    n, c = 16800, 128256
    t0 = time.perf_counter()
    z = torch.empty(n, c, dtype=torch.bfloat16)
    for i in range(0, n, CHUNK):
        z[i:i + CHUNK] = torch.randn(min(CHUNK, n - i), c) * 3
    y = torch.randint(0, c, (n,))
    z[n - 1, y[n - 1]] = 30.0  # a confident last row (loss ~0): a misplaced read shows
    rows = check_rows(n, c)
    ref_losses, ref_p = reference(z, y, rows)
    z.requires_grad_(True)
    go = torch.randn(n).to(torch.bfloat16)
    print(f"# bf16 setup (data + float64 reference) {time.perf_counter() - t0:.1f}s", flush=True)
    for backend in ("auto", "rowblock"):
        for red in ("mean", "none"):
            run_cross_entropy(f"ce bf16 {n}x{c} backend={backend} {red}{NONE_NOTE[red]}", z,
                              y, rows, ref_losses, ref_p, go, red, grad_tol=2e-2,
                              loss_tol=5e-3, backend=backend, no_grad=red == "none")
    t0 = time.perf_counter()
    xt.set_compiled_kernel(True)
    tiny = torch.randn(600, 1000, dtype=torch.bfloat16, requires_grad=True)
    xt.cross_entropy(tiny, torch.randint(0, 1000, (600,))).backward()  # compile it
    print(f"# compiled kernel ready {time.perf_counter() - t0:.1f}s", flush=True)
    for red in ("mean", "none"):
        run_cross_entropy(f"ce bf16 {n}x{c} compiled kernel {red}{NONE_NOTE[red]}", z, y,
                          rows, ref_losses, ref_p, go, red, grad_tol=2e-2, loss_tol=5e-3,
                          no_grad=red == "none")
    xt.set_block_workers(False)  # the compiled callable in blocks (not the ctypes kernel)
    try:
        run_cross_entropy(f"ce bf16 {n}x{c} compiled kernel, block workers off, mean", z, y,
                          rows, ref_losses, ref_p, go, "mean", grad_tol=2e-2, loss_tol=5e-3)
    finally:
        xt.set_block_workers(True)
        xt.set_compiled_kernel(False)


def group_f32() -> None:
    """float32 (2**25 + 17, 64): 2**31 + 1088 logits, 8.6 GB; forward only (no gradient), then
    with the gradient written over the logits (``inplace_backward=True`` on an activation)."""
    torch.manual_seed(1)
    c = 64
    n = LIMIT // c + 17
    t0 = time.perf_counter()
    d = 4
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(d, c) * 1.5
    z = x @ w  # an activation: crossent may overwrite it with its gradient
    y = torch.randint(0, c, (n,))
    y[:: 1000] = -100  # some ignored rows: the "mean" count
    rows = check_rows(n, c)
    with torch.no_grad():
        losses = torch.empty(n, dtype=torch.float64)
        for i in range(0, n, 1 << 20):
            losses[i:i + (1 << 20)] = F.cross_entropy(z[i:i + (1 << 20)].double(),
                                                      y[i:i + (1 << 20)], reduction="none")
        idx = torch.tensor(rows)
        p = torch.softmax(z[idx].double(), 1)
        valid = y[idx] != -100
        p[torch.arange(len(rows))[valid], y[idx][valid]] -= 1.0
        p[~valid] = 0.0
    counted = int((y != -100).sum())
    mean_ref = losses.sum() / counted
    print(f"# f32 setup {time.perf_counter() - t0:.1f}s", flush=True)
    import crossent.torch as xt

    for backend in ("auto", "rowblock"):
        for red in ("mean", "none"):
            _reset_peak()
            t0 = time.perf_counter()
            with torch.no_grad():
                loss = xt.cross_entropy(z, y, reduction=red, backend=backend)
            if red == "none":
                err = float(((loss.double() - losses).abs() / (1 + losses.abs())).max())
            else:
                err = abs(float(loss) - float(mean_ref)) / (1 + abs(float(mean_ref)))
            del loss
            report(f"ce f32 {n}x{c} forward only backend={backend} {red}", err <= 1e-5, t0,
                   loss_rel=err)
    _reset_peak()
    t0 = time.perf_counter()
    captured = {}
    z.register_hook(lambda g: captured.update(g=g[idx].clone()))
    loss = xt.cross_entropy(z, y, inplace_backward=True)  # "mean"
    err = abs(float(loss) - float(mean_ref)) / (1 + abs(float(mean_ref)))
    loss.backward()
    gerr = grad_error(captured["g"], p / counted, 1.0 / counted)
    report(f"ce f32 {n}x{c} inplace_backward activation mean", err <= 1e-5 and
           gerr <= 1e-4, t0, loss_rel=err, grad_rel=gerr)


def group_head() -> None:
    """linear head, bfloat16, N=20000, D=64, V=128256: 2.57e9 logits never materialised."""
    import crossent.torch as xt

    torch.manual_seed(2)
    n, d, v = 20000, 64, 128256
    t0 = time.perf_counter()
    x = torch.randn(n, d).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, d) * (2.5 / d ** 0.5)).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, v, (n,))
    go = torch.randn(n).to(torch.bfloat16)
    rows = check_rows(n, v)
    idx = torch.tensor(rows)
    losses = torch.empty(n, dtype=torch.float64)
    dx = {r: torch.zeros(n, d, dtype=torch.float64) for r in ("mean", "none")}
    dw = {r: torch.zeros(v, d, dtype=torch.float64) for r in ("mean", "none")}
    w64 = w.detach().double()
    with torch.no_grad():
        for i in range(0, n, CHUNK):
            xs, ys = x[i:i + CHUNK], y[i:i + CHUNK]
            zc = F.linear(xs, w).double()  # torch's bfloat16 logits, then float64
            losses[i:i + CHUNK] = F.cross_entropy(zc, ys, reduction="none")
            g = torch.softmax(zc, 1)
            del zc
            g[torch.arange(len(ys)), ys] -= 1.0
            for red, scale in (("mean", torch.full((len(ys), 1), 1.0 / n, dtype=torch.float64)),
                               ("none", go[i:i + CHUNK].double().unsqueeze(1))):
                gs = g * scale
                dx[red][i:i + CHUNK] = gs @ w64
                dw[red] += gs.T @ xs.double()
            del g, gs
    print(f"# head setup (float64 reference) {time.perf_counter() - t0:.1f}s", flush=True)
    for red in ("mean", "none"):
        _reset_peak()
        t0 = time.perf_counter()
        loss = xt.linear_cross_entropy(x, w, y, reduction=red)
        if red == "none":
            err = float(((loss.double() - losses).abs() / (1 + losses.abs())).max())
            loss.backward(go)
        else:
            err = abs(float(loss) - float(losses.mean())) / (1 + abs(float(losses.mean())))
            loss.backward()
        # dx rows (first, around the logits' element 2**31, last) and dW in bfloat16 against
        # float64 sums: relative to the row's / the whole tensor's largest entry
        ex = dx[red][idx]
        dx_err = float(((x.grad[idx].double() - ex).abs() / ex.abs().amax(1, keepdim=True)).max())
        dw_err = float((w.grad.double() - dw[red]).abs().max() / dw[red].abs().max())
        dw_last = float((w.grad[-3:].double() - dw[red][-3:]).abs().max()
                        / dw[red][-3:].abs().max())
        ok = err <= 2e-2 and dx_err <= 3e-2 and dw_err <= 3e-2 and dw_last <= 3e-2
        report(f"linear head bf16 N={n} D={d} V={v} {red}", ok, t0, loss_rel=err,
               dx_rel=dx_err, dW_rel=dw_err, dW_last_cols_rel=dw_last)
        x.grad = w.grad = None
        del loss


def group_counts() -> None:
    """"mean" over more than 2**24 counted rows (float32 integers stop being exact) and
    2**31 + 192 bfloat16 logits in rows of 64 classes, with ignored rows; num_items past
    2**32 on a small input."""
    import crossent.torch as xt

    torch.manual_seed(3)
    c = 64
    n = LIMIT // c + 3
    t0 = time.perf_counter()
    z = torch.empty(n, c, dtype=torch.bfloat16)
    for i in range(0, n, 1 << 20):
        z[i:i + (1 << 20)] = torch.randn(min(1 << 20, n - i), c) * 2
    y = torch.randint(0, c, (n,))
    y[:: 7] = -100
    rows = check_rows(n, c)
    idx = torch.tensor(rows)
    y[idx[-1]] = 5
    losses = torch.empty(n, dtype=torch.float64)
    step = 1 << 20
    for i in range(0, n, step):
        losses[i:i + step] = F.cross_entropy(z[i:i + step].double(), y[i:i + step],
                                             reduction="none")
    counted = int((y != -100).sum())
    p = torch.softmax(z[idx].double(), 1)
    valid = y[idx] != -100
    p[torch.arange(len(rows))[valid], y[idx][valid]] -= 1.0
    p[~valid] = 0.0
    z.requires_grad_(True)
    print(f"# counts setup {time.perf_counter() - t0:.1f}s (counted rows {counted})",
          flush=True)
    for backend in ("auto", "rowblock"):
        _reset_peak()
        t0 = time.perf_counter()
        loss = xt.cross_entropy(z, y, backend=backend)
        err = abs(float(loss) - float(losses.sum() / counted)) / float(losses.sum() / counted)
        loss.backward()
        gerr = grad_error(z.grad[idx], p / counted, 1.0 / counted)
        z.grad = None
        report(f"mean count bf16 {n}x{c} ({counted} counted) backend={backend}",
               err <= 5e-3 and gerr <= 2e-2, t0, loss_rel=err, grad_rel=gerr)  # bf16 loss
    # num_items beyond int32 and uint32 (small tensors)
    _reset_peak()
    t0 = time.perf_counter()
    zs = torch.randn(64, 1000, dtype=torch.float64, requires_grad=True)
    ys = torch.randint(0, 1000, (64,))
    big = 3 * 2**32 + 1
    loss = xt.cross_entropy(zs, ys, num_items=big)
    ref = F.cross_entropy(zs.detach(), ys, reduction="sum") / big
    loss.backward()
    gref = (torch.softmax(zs.detach(), 1) - F.one_hot(ys, 1000)) / big
    err = abs(float(loss) / float(ref) - 1)
    gerr = float(((zs.grad - gref).abs() / gref.abs().max()).max())
    report(f"num_items={big} float64", err <= 1e-12 and gerr <= 1e-12, t0, loss_rel=err,
           grad_rel=gerr)


GROUPS = {"bf16": group_bf16, "f32": group_f32, "head": group_head, "counts": group_counts}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--group"]:
        GROUPS[argv[1]]()
        return 1 if FAILED else 0
    names = argv or list(GROUPS)
    failed = False
    for name in names:
        print(f"## group {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, __file__, "--group", name])
        print(f"## group {name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        failed = failed or rc != 0
    print("FAIL" if failed else "ALL PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
