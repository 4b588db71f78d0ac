"""Train-step and inference speed of every method against the frozen-base floor and against PEFT.

Not a test. One process, cases interleaved round by round (each timed call preceded by an untimed
one of the same case), median of the rounds,
a fixed thread count. Ratios are to the *floor*: the same base model with every weight frozen,
backpropagating to its input (the work any adapter must at least do). Each method's *FLOP limit*
is floor × (adapted FLOPs / floor FLOPs), FLOPs counted by ``torch.utils.flop_counter`` over one
forward + backward (FFTs are not counted, so the limit is optimistic for FFT-based methods).
Memory is what the step keeps for backward (unique storages seen by saved-tensor hooks) plus the
trainable parameters with their gradients and AdamW moments; CPU peak RSS is not per-case.

    python benchmarks/speed.py --out docs/performance.md            # full run
    python benchmarks/speed.py --rounds 3 --workloads mlp           # a quick look
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rankwise as rw

try:
    import peft
except ImportError:  # the comparison columns stay empty without PEFT
    peft = None


@dataclass
class Case:
    label: str
    method: str
    ours: Callable[[tuple[str, ...]], rw.AdapterConfig]
    theirs: Callable[[list[str]], object] | None = None  # PEFT config for the same method


def _cases() -> list[Case]:
    cases = [
        Case("lora r=8", "lora", lambda t: rw.LoRAConfig(rank=8, targets=t), lambda t: peft.LoraConfig(r=8, lora_alpha=16, target_modules=t)),
        Case("lora r=64", "lora", lambda t: rw.LoRAConfig(rank=64, alpha=128, targets=t), lambda t: peft.LoraConfig(r=64, lora_alpha=128, target_modules=t)),
        Case("dora r=8", "dora", lambda t: rw.DoRAConfig(rank=8, targets=t), lambda t: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=t)),
    ]
    cases += [case for case in _registered_cases() if case.method in rw.methods()]
    return cases


def _registered_cases() -> list[Case]:
    """Methods beyond LoRA/DoRA at the settings the performance targets name."""
    make = rw.make_config
    return [
        Case("c3a block 64", "c3a", lambda t: make("c3a", block_size=64, targets=t), lambda t: peft.C3AConfig(block_size=64, target_modules=t)),
        Case("gralora r=32 k=2", "gralora", lambda t: make("gralora", rank=32, k=2, targets=t),
             lambda t: peft.GraloraConfig(r=32, gralora_k=2, target_modules=t)),
        Case("bone r=64", "bone", lambda t: make("bone", rank=64, targets=t), lambda t: peft.MissConfig(r=64, target_modules=t)),
        Case("bat r=64", "bat", lambda t: make("bat", rank=64, targets=t), lambda t: peft.MissConfig(r=64, init_weights="bat", target_modules=t)),
        Case("adalora r=8", "adalora", lambda t: make("adalora", rank=8, targets=t),
             lambda t: peft.AdaLoraConfig(init_r=8, target_r=8, total_step=1000, target_modules=t)),
    ] + [
        Case(f"{name} (default)", name, lambda t, name=name: make(name, targets=t))
        for name in rw.methods()
        if name not in {"lora", "dora", "c3a", "gralora", "bone", "bat", "adalora"}
    ]


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    make_input: Callable[[], dict[str, torch.Tensor]]


def _mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.GELU())])


def _encoder() -> nn.Module:
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


WORKLOADS = {
    "mlp": Workload("4 × Linear(1024, 1024) + GELU, input (8, 128, 1024)", _mlp, ("0", "2", "4", "6"),
                    lambda: {"input": torch.randn(8, 128, 1024, requires_grad=True)}),
    "encoder": Workload("MiniLM-size BERT encoder (384 hidden, 6 layers), batch 16 × 128, adapters on query/key/value/dense",
                        _encoder, ("query", "key", "value", "dense"),
                        lambda: {"inputs_embeds": torch.randn(16, 128, 384, requires_grad=True)}),
}


def _call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if "input" in inputs:
        return model(inputs["input"])
    return model(**inputs).last_hidden_state


@dataclass
class Runner:
    """One model in one configuration: a train step and an inference forward."""

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer | None = field(default=None)

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-6) if params else None

    def train_step(self) -> None:
        _call(self.model, self.inputs).square().mean().backward()
        if self.optimizer:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for tensor in self.inputs.values():
            tensor.grad = None

    def infer(self) -> None:
        with torch.no_grad():
            _call(self.model, self.inputs)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            _call(self.model, self.inputs).square().mean().backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def memory_mb(self) -> float:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _call(self.model, self.inputs).square().mean()
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return (sum(storages.values()) + 4 * trainable) / 2**20  # param, grad, two moments


def _median_times(runners: dict[str, Runner], action: str, rounds: int) -> dict[str, float]:
    for runner in runners.values():  # warm-up
        getattr(runner, action)()
    samples: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            # An untimed call first: switching between models leaves caches and the allocator cold,
            # which would charge each case for its neighbour's memory traffic.
            getattr(runner, action)()
            start = time.perf_counter()
            getattr(runner, action)()
            samples[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in samples.items()}


def run_workload(key: str, rounds: int, methods: set[str] | None) -> str:
    workload = WORKLOADS[key]
    torch.manual_seed(0)
    base = workload.build()
    base.requires_grad_(False)
    inputs = workload.make_input()
    runners = {"floor": Runner(base, inputs)}
    for case in _cases():
        if methods and case.method not in methods:
            continue
        runners[f"rw:{case.label}"] = Runner(rw.adapt(copy.deepcopy(base), case.ours(workload.targets)), inputs)
        if peft is not None and case.theirs is not None:
            runners[f"peft:{case.label}"] = Runner(peft.get_peft_model(copy.deepcopy(base), case.theirs(list(workload.targets))), inputs)
        merged = rw.merge(copy.deepcopy(runners[f"rw:{case.label}"].model)) if _mergeable(case) else None
        if merged is not None:
            runners[f"merged:{case.label}"] = Runner(merged, inputs)
    train = _median_times({k: r for k, r in runners.items() if not k.startswith("merged:")}, "train_step", rounds)
    infer = _median_times(runners, "infer", rounds)
    flops = {k: r.flops() for k, r in runners.items() if not k.startswith("merged:")}
    memory = {k: r.memory_mb() for k, r in runners.items() if not k.startswith("merged:")}

    lines = [
        f"### {workload.name}",
        "",
        f"Floor: train step {1e3 * train['floor']:.1f} ms, inference {1e3 * infer['floor']:.1f} ms, "
        f"{memory['floor']:.0f} MB kept for backward.",
        "",
        "| method | train ms | train / floor | FLOP limit | train / limit | infer / floor (merged) | memory MB | PEFT train / floor | rankwise / PEFT train | PEFT memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in _cases():
        ours = f"rw:{case.label}"
        if ours not in train:
            continue
        limit = flops[ours] / flops["floor"]
        ratio = train[ours] / train["floor"]
        merged = f" ({infer[f'merged:{case.label}'] / infer['floor']:.2f})" if f"merged:{case.label}" in infer else ""
        theirs = f"peft:{case.label}"
        peft_cols = (
            f"{train[theirs] / train['floor']:.2f} | **{train[ours] / train[theirs]:.2f}** | {memory[theirs]:.0f}"
            if theirs in train else "— | — | —"
        )
        lines.append(
            f"| {case.label} | {1e3 * train[ours]:.1f} | {ratio:.2f} | {limit:.2f} | {ratio / limit:.2f} | "
            f"{infer[ours] / infer['floor']:.2f}{merged} | {memory[ours]:.0f} | {peft_cols} |"
        )
    return "\n".join(lines)


def _mergeable(case: Case) -> bool:
    from rankwise.core import registry

    return registry.get(case.method).module_class.mergeable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", help="registry names to include (default: all)")
    parser.add_argument("--out", help="write the markdown report here as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (
        f"Run {datetime.date.today()} on {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, PEFT {peft.__version__ if peft else '—'}, {args.threads} threads, fp32, "
        f"median of {args.rounds} interleaved rounds.\n\nCommand: `python benchmarks/speed.py "
        f"--rounds {args.rounds} --threads {args.threads}`\n"
    )
    sections = [run_workload(key, args.rounds, set(args.methods) if args.methods else None) for key in args.workloads]
    report = header + "\n" + "\n\n".join(sections) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as file:
            file.write(report)


if __name__ == "__main__":
    main()
