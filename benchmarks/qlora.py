"""QLoRA on SmolLM2-135M: LoRA r=8 on q_proj, v_proj over a bitsandbytes 4-bit (nf4) base against
the same run over the fp32 base, on the Friends task (held-out perplexity).

Not a test. Each base trains in a process of its own (same data, seed, steps and thread count),
so that each peak resident set size (RSS) is that run's alone. The peak is taken over the training
and the evaluations, after the model is loaded, quantized and adapted: the kernel's high-water mark
is reset there, once the freed heap is returned to the system (the GGUF checkpoint loads as fp32
for both; a transformers checkpoint would load 4-bit directly, docs/qlora.md). The train-step time
comes from a third process holding both bases, one step of each per round on the same batch: the
median over rounds of the ratio, as benchmarks/speed.py times against its baseline.

    HF_HUB_OFFLINE=1 python benchmarks/qlora.py                       # the table of docs/qlora.md
    HF_HUB_OFFLINE=1 python benchmarks/qlora.py --base nf4 --steps 5  # one base, one JSON line
    HF_HUB_OFFLINE=1 python benchmarks/qlora.py --timing --rounds 3   # the step-time ratio alone

Needs the benchmark assets (docs/benchmarks.md) and bitsandbytes (``pip install rankwise[quant]``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import rankwise as rw
from rankwise.bench.tasks import Friends
from rankwise.bench.tasks.base import Sizes

LORA = rw.LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` of the decoder layers as a bitsandbytes nf4 ``Linear4bit`` computing in
    fp32 (the fp32 run's compute dtype); the tied embedding and LM head stay fp32."""
    import bitsandbytes as bnb

    layers = model.get_submodule("model.layers")
    for path, layer in [(p, m) for p, m in layers.named_modules() if type(m) is nn.Linear]:
        quantized = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, layer.bias is not None, compute_dtype=torch.float32, quant_type="nf4"
        )
        quantized.weight = bnb.nn.Params4bit(layer.weight.detach(), requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(layers.get_submodule(parent), name, quantized.to("cpu"))  # bitsandbytes quantizes on the move
    return model


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    # glibc keeps freed heap pages (the fp32 weights the quantization replaced, its temporaries)
    # in the process until trimmed; then writing 5 to clear_refs resets the peak RSS (VmHWM) to
    # the current RSS (Linux).
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _task(steps: int, batch_size: int, length: int, test_blocks: int) -> Friends:
    sizes = Sizes(train=steps * batch_size, val=1, test=test_blocks, length=length, steps=steps, batch_size=batch_size)
    task = Friends(dataclasses.replace(sizes, eval_batch_size=8))
    task.prepare()
    return task


def _adapted(model: nn.Module, base: str, gradient_checkpointing: bool) -> nn.Module:
    """``model`` (SmolLM2, fp32) on ``base``, prepared as docs/qlora.md says and adapted."""
    model.config.use_cache = False
    if base == "nf4":
        quantize_nf4(model)
    rw.prepare_for_quantized_training(model, gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(0)  # the same adapter initialization on both bases
    return rw.adapt(model, LORA).train()


def _step(task: Friends, model: nn.Module, optimizer: torch.optim.Optimizer, index: torch.Tensor) -> float:
    loss = task.loss(model, task.batch("train", index))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def run(
    base: str,
    steps: int,
    batch_size: int,
    length: int,
    test_blocks: int,
    lr: float,
    threads: int,
    gradient_checkpointing: bool,
) -> dict:
    """One base: train ``steps`` steps; perplexity before and after, the peak RSS."""
    torch.set_num_threads(threads)
    task = _task(steps, batch_size, length, test_blocks)
    # The loaded model itself, the only copy: a deepcopy would count twice in the RSS.
    model = _adapted(task.pretrained, base, gradient_checkpointing)
    _reset_peak_rss()
    rss_start = _status_kib("VmRSS")
    before = task.evaluate(model, "test")["perplexity"]
    model.train()
    optimizer = _optimizer(model, lr)
    order = torch.randperm(steps * batch_size, generator=torch.Generator().manual_seed(0))
    losses = [_step(task, model, optimizer, order[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]
    after = task.evaluate(model, "test")["perplexity"]
    return {
        "base": base,
        "tokens_per_step": batch_size * length,
        "test_tokens": test_blocks * length,
        "perplexity_before": before,
        "perplexity_after": after,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "rss_after_setup_mib": rss_start / 1024,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "trainable": rw.summary(model).trainable,
    }


def timing(rounds: int, batch_size: int, length: int, threads: int, gradient_checkpointing: bool) -> dict:
    """Both bases in one process, one train step of each per round on the same batch: the median
    over rounds of the nf4 step time over the fp32 one (load from other processes that drifts
    between rounds cancels out of each ratio). The first round warms up and is not counted."""
    torch.set_num_threads(threads)
    task = _task(rounds, batch_size, length, 1)
    models = {base: _adapted(copy.deepcopy(task.pretrained), base, gradient_checkpointing) for base in ("fp32", "nf4")}
    optimizers = {base: _optimizer(model, 1e-3) for base, model in models.items()}
    seconds: dict[str, list[float]] = {base: [] for base in models}
    for i in range(rounds):
        index = torch.arange(i * batch_size, (i + 1) * batch_size)
        for base, model in models.items():
            start = time.perf_counter()
            _step(task, model, optimizers[base], index)
            seconds[base].append(time.perf_counter() - start)
    fp32, nf4 = seconds["fp32"][1:], seconds["nf4"][1:]
    return {
        "fp32_step_seconds": statistics.median(fp32),
        "nf4_step_seconds": statistics.median(nf4),
        "ratio": statistics.median(q / f for q, f in zip(nf4, fp32, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=("fp32", "nf4"), help="run one base in this process (default: both, apart)")
    parser.add_argument("--timing", action="store_true", help="only the step-time ratio, both bases in this process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=8, help="timing rounds (one step of each base)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="tokens per block")
    parser.add_argument("--test-blocks", type=int, default=16, help="held-out blocks the perplexity is taken on")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as prepare_for_quantized_training sets it up (both bases)",
    )
    args = parser.parse_args()
    shared = {"batch_size": args.batch_size, "length": args.length, "threads": args.threads}
    shared["gradient_checkpointing"] = args.gradient_checkpointing
    if args.timing:
        print(json.dumps(timing(args.rounds, **shared)))
        return
    if args.base:
        print(json.dumps(run(args.base, args.steps, test_blocks=args.test_blocks, lr=args.lr, **shared)))
        return
    rows = {}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("base", "timing")]
    flags = [f for f in flags if "checkpointing" not in f]
    flags.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    for mode in (["--base", "fp32"], ["--base", "nf4"], ["--timing"]):
        command = [sys.executable, __file__, *mode, *flags]
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        rows[mode[-1]] = json.loads(output.strip().splitlines()[-1])
    fp32, nf4, times = rows["fp32"], rows["nf4"], rows["--timing"]
    checkpointing = "with" if args.gradient_checkpointing else "without"
    print(f"SmolLM2-135M, Friends, LoRA r=8 on q_proj/v_proj, {args.steps} steps of {fp32['tokens_per_step']} tokens,")
    print(
        f"AdamW lr {args.lr}, {args.threads} thread(s), {checkpointing} gradient checkpointing; "
        f"perplexity on {fp32['test_tokens']} held-out tokens\n"
    )
    print("| base | held-out perplexity before → after | peak RSS (MiB) | RSS after setup (MiB) | train step (s) |")
    print("|---|---|---|---|---|")
    for row in (fp32, nf4):
        step = times[row["base"] + "_step_seconds"]
        print(
            f"| {row['base']} | {row['perplexity_before']:.2f} → {row['perplexity_after']:.2f} | "
            f"{row['peak_rss_mib']:.0f} | {row['rss_after_setup_mib']:.0f} | {step:.2f} |"
        )
    print(
        f"\nnf4 / fp32: peak RSS {nf4['peak_rss_mib'] / fp32['peak_rss_mib']:.2f}×, "
        f"RSS after setup {nf4['rss_after_setup_mib'] / fp32['rss_after_setup_mib']:.2f}×, "
        f"train step {times['ratio']:.2f}× (median over {args.rounds - 1} interleaved rounds)"
    )
    assert all(math.isfinite(row["perplexity_after"]) for row in (fp32, nf4))


if __name__ == "__main__":
    main()
