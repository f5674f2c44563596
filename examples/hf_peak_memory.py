"""Peak memory of one training step of a small Llama at a large vocabulary: transformers'
own loss against ``crossent.integrations.transformers.patch``.

    python examples/hf_peak_memory.py                      # vocab 131072, 2 x 1024 tokens
    python examples/hf_peak_memory.py --vocab 32768 --batch 1 --seq 512 --hidden 64

Each variant runs in a fresh Python process (``--variant`` runs one and prints a JSON line).
On CUDA the figure is ``torch.cuda.max_memory_allocated()`` above what was allocated before
the step; on CPU it is the growth of the process's peak resident set (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs`` where the kernel allows) over
the step, which also counts allocator and library overheads. Same model, same data, same seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, vocab: int, batch: int, seq: int, hidden: int, device: str) -> dict:
    """Run one forward + backward with labels and return the step's peak memory (MiB)."""
    import torch
    import transformers

    from crossent.integrations.transformers import patch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=seq, use_cache=False)
    model = transformers.LlamaForCausalLM(config).to(device).train()
    if variant == "crossent":
        patch(model)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
        except OSError:
            pass
        before = _proc_kib("VmRSS") * 1024
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _proc_kib("VmHWM") * 1024 - before
    return {"variant": variant, "device": device, "vocab": vocab, "tokens": batch * seq,
            "hidden": hidden, "loss": float(loss.detach()), "peak_mib": round(peak / 2**20, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--variant", choices=["transformers", "crossent"], default=None)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (args.vocab, args.batch, args.seq, args.hidden, args.device)
    if args.variant:
        result = measure(args.variant, *sizes)
        print(json.dumps(result))
        return [result]
    results = []
    for variant in ("transformers", "crossent"):
        cmd = [sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab),
               "--batch", str(args.batch), "--seq", str(args.seq),
               "--hidden", str(args.hidden), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref, ours = results
    print(f"Llama, 1 layer, hidden {args.hidden}, vocab {args.vocab}, "
          f"{ref['tokens']} tokens, {args.device}: peak memory of one training step")
    for r in results:
        print(f"  {r['variant']:<13} {r['peak_mib']:>9.1f} MiB   loss {r['loss']:.6f}")
    print(f"  crossent / transformers: {ours['peak_mib'] / max(ref['peak_mib'], 1e-9):.2f}")
    return results


if __name__ == "__main__":
    main()
