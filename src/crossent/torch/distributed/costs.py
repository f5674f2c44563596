"""Cost model of the vocab-parallel losses (the formulas of ``docs/scaling.md``).

:func:`vocab_parallel_costs` gives, for one call of
:func:`~crossent.torch.distributed.vocab_parallel_linear_cross_entropy` (or, with
``hidden=None``, :func:`~crossent.torch.distributed.vocab_parallel_cross_entropy`) on one
rank, the all-reduce count and payload, the logits buffer, the per-rank FLOPs and memory.
The tests check the collective counts, payload bytes and logits-chunk bytes against the
counting wrapper at small sizes; ``python -m crossent.torch.distributed.costs`` prints the
table of ``docs/scaling.md`` (V = 256k, N = 2^20, D = 8192, tensor-parallel 8 and 64).
"""

from __future__ import annotations

import math

from .._rules import default_chunk as fused_default_chunk
from ._common import FIELDS
from .linear import default_chunk

__all__ = ["agreement_bytes", "ring_bytes", "vocab_parallel_costs"]


def agreement_bytes(world: int) -> int:
    """Bytes of the agreement all-reduce that opens every call: ``world x F`` int64."""
    return 8 * len(FIELDS) * world


def ring_bytes(payload: float, world: int) -> float:
    """Bytes a rank sends (and receives) in a ring all-reduce of ``payload`` bytes."""
    return 2.0 * (world - 1) / world * payload


def vocab_parallel_costs(
    num_rows: int,
    num_classes: int,
    world: int,
    *,
    hidden: int | None = None,
    chunk_size: int | None = None,
    itemsize: int = 4,
    weighted: bool = False,
    label_smoothing: bool = False,
    reduce_input_grad: bool = True,
    param_itemsize: int = 2,
) -> dict[str, float]:
    """Per-rank costs of one forward + backward (even split, ``V_r = V / world``).

    Every call opens with the agreement all-reduce (SUM of ``world x F`` int64,
    :func:`agreement_bytes`). Then ``k = 2 + [weighted] + [label_smoothing]`` values per
    row go into the SUM buffer, one into the MAX buffer; ``itemsize`` is the compute
    dtype's (4: float32).

    Logits given (``hidden=None``): 3 all-reduces, ``8 F t + itemsize (k + 1) N`` bytes.
    Linear (``hidden=D``, chunk ``B``): ``1 + 2 ceil(N / B)`` all-reduces in forward with
    the same payload, plus one ``N D`` all-reduce of the input gradient in backward.
    FLOPs: ``6 N D V_r`` (logits, ``dX``, ``dW``) plus about ``8 N V_r`` elementwise.
    """
    n, v_r = num_rows, -(-num_classes // world)
    k = 2 + int(weighted) + int(label_smoothing)
    stats = itemsize * (k + 1) * n + agreement_bytes(world)
    out: dict[str, float] = {"local_classes": v_r, "values_per_row": k + 1}
    if hidden is None:
        calls = 3 if world > 1 else 0
        stats = stats if world > 1 else 0
        out.update(all_reduces_forward=calls, all_reduces_backward=0, payload_bytes=stats,
                   logits_chunk_bytes=0, flops=8.0 * n * v_r)
        out["wire_bytes"] = ring_bytes(stats, world) if world > 1 else 0.0
        return out
    d = hidden
    chunk = default_chunk(v_r) if chunk_size is None else chunk_size
    chunks = max(1, math.ceil(n / chunk))
    grad_x = itemsize * n * d if reduce_input_grad and world > 1 else 0
    out.update(
        chunk_rows=min(chunk, n),
        all_reduces_forward=1 + 2 * chunks if world > 1 else 0,
        all_reduces_backward=1 if grad_x else 0,
        payload_bytes=(stats if world > 1 else 0) + grad_x,
        stats_payload_bytes=stats if world > 1 else 0,
        logits_chunk_bytes=itemsize * min(chunk, n) * v_r,
        flops=6.0 * n * d * v_r + 8.0 * n * v_r,
        weight_bytes=param_itemsize * v_r * d,
        weight_grad_bytes=itemsize * v_r * d,
        input_grad_bytes=itemsize * n * d,
    )
    out["wire_bytes"] = ring_bytes(out["payload_bytes"], world) if world > 1 else 0.0
    return out


def _fmt(x: float, unit: str = "B") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                          (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def table(num_rows: int = 1 << 20, num_classes: int = 256_000, hidden: int = 8192,
          worlds: tuple[int, ...] = (1, 8, 64)) -> str:
    """The per-rank comparison of docs/scaling.md: (a) unfused, (b) fused, (c) vocab-parallel
    fused (bf16 parameters and activations, float32 logits work and gradients)."""
    n, v, d = num_rows, num_classes, hidden
    lines = [f"N={n} V={v} D={d}; per rank, one forward + backward", ""]
    lines.append("| variant | t | logits held | weight + grad | FLOPs | all-reduces | "
                 "payload | wire (ring) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for t in worlds:
        v_r = v / t
        # (a) unfused vocab-parallel head (Megatron without fusion): local logits bf16 and
        # the float32 softmax saved for backward; 3 all-reduces of N floats + dX all-reduce
        held = n * v_r * (2 + 4)
        comm = (12.0 * n + 2.0 * n * d) if t > 1 else 0.0
        lines.append(f"| (a) unfused | {t} | {_fmt(held)} | {_fmt(6 * v_r * d)} | "
                     f"{_fmt(6.0 * n * d * v_r + 10.0 * n * v_r, 'FLOP')} | "
                     f"{4 if t > 1 else 0} | {_fmt(comm)} | {_fmt(ring_bytes(comm, t))} |")
        # (b) crossent fused, head not vocab-split: rows split over the t ranks, full W on
        # each, the V x D float32 weight gradient all-reduced; bf16 logits chunks of
        # linear_cross_entropy's default size
        chunk_b = min(fused_default_chunk(v, d, 2), math.ceil(n / t))
        gw = 4.0 * v * d if t > 1 else 0.0
        lines.append(f"| (b) fused, rows split | {t} | {_fmt(2.0 * chunk_b * v)} | "
                     f"{_fmt(6 * v * d)} | {_fmt(6.0 * (n / t) * d * v, 'FLOP')} | "
                     f"{1 if t > 1 else 0} | {_fmt(gw)} | {_fmt(ring_bytes(gw, t))} |")
        c = vocab_parallel_costs(n, v, t, hidden=d)
        lines.append(f"| (c) vocab-parallel fused | {t} | {_fmt(c['logits_chunk_bytes'])} "
                     f"(B={c['chunk_rows']}) | "
                     f"{_fmt(c['weight_bytes'] + c['weight_grad_bytes'])} | "
                     f"{_fmt(c['flops'], 'FLOP')} | "
                     f"{c['all_reduces_forward'] + c['all_reduces_backward']} | "
                     f"{_fmt(c['payload_bytes'])} | {_fmt(c['wire_bytes'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
