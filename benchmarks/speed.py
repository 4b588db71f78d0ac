"""Train-step and inference speed of every method against the frozen-base floor and against PEFT.

Not a test. One process, a fixed thread count. Each round times every method's group (rankwise,
PEFT, merged) right after the *floor*: the same base model with every weight frozen,
backpropagating to its input (the work any adapter must at least do). Every timed call is preceded
by an untimed one of the same model, and every ratio is the median over rounds of a time divided
by the floor (or by PEFT) timed moments before it in the same round, so load from other processes
that drifts between groups or rounds cancels out of the ratios. Each method's *FLOP limit*
is floor × (adapted FLOPs / floor FLOPs), FLOPs counted by ``torch.utils.flop_counter`` over one
forward + backward (FFTs are not counted, so the limit is optimistic for FFT-based methods).
Memory is what the step keeps for backward (unique storages seen by saved-tensor hooks, the model's
parameters excepted) plus the trainable parameters with their gradients and AdamW moments; CPU peak RSS is not per-case.

    python benchmarks/speed.py --out docs/performance.md            # full run
    python benchmarks/speed.py --rounds 3 --workloads mlp           # a quick look
    python benchmarks/speed.py --named --threads 1 --workloads encoder --out docs/performance.md --section named

``--named`` measures named adapters instead (:func:`run_named`): the train step of a model holding 8
LoRA adapters with one active over a model holding only that one, and a mixed-batch forward
(``rw.per_example``, 4 adapters over the batch) over a one-adapter forward of the same batch.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
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
        Case(
            "lora r=8",
            "lora",
            lambda t: rw.LoRAConfig(rank=8, targets=t),
            lambda t: peft.LoraConfig(r=8, lora_alpha=16, target_modules=t),
        ),
        Case(
            "lora r=64",
            "lora",
            lambda t: rw.LoRAConfig(rank=64, alpha=128, targets=t),
            lambda t: peft.LoraConfig(r=64, lora_alpha=128, target_modules=t),
        ),
        Case(
            "dora r=8",
            "dora",
            lambda t: rw.DoRAConfig(rank=8, targets=t),
            lambda t: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=t),
        ),
    ]
    cases += [case for case in _registered_cases() if case.method in rw.methods()]
    return cases


def _registered_cases() -> list[Case]:
    """Methods beyond LoRA/DoRA at the settings the performance targets name."""
    make = rw.make_config
    return [
        Case(
            "c3a block 64",
            "c3a",
            lambda t: make("c3a", block_size=64, targets=t),
            lambda t: peft.C3AConfig(block_size=64, target_modules=t),
        ),
        Case(
            "gralora r=32 k=2",
            "gralora",
            lambda t: make("gralora", rank=32, k=2, targets=t),
            lambda t: peft.GraloraConfig(r=32, gralora_k=2, target_modules=t),
        ),
        Case(
            "bone r=64",
            "bone",
            lambda t: make("bone", rank=64, targets=t),
            lambda t: peft.MissConfig(r=64, target_modules=t),
        ),
        Case(
            "bat r=64",
            "bat",
            lambda t: make("bat", rank=64, targets=t),
            lambda t: peft.MissConfig(r=64, init_weights="bat", target_modules=t),
        ),
        Case(
            "adalora r=8",
            "adalora",
            lambda t: make("adalora", rank=8, targets=t),  # α = 16 on both sides
            lambda t: peft.AdaLoraConfig(init_r=8, target_r=8, lora_alpha=16, total_step=1000, target_modules=t),
        ),
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
    config = transformers.BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


WORKLOADS = {
    "mlp": Workload(
        "4 × Linear(1024, 1024) + GELU, input (8, 128, 1024)",
        _mlp,
        ("0", "2", "4", "6"),
        lambda: {"input": torch.randn(8, 128, 1024, requires_grad=True)},
    ),
    "encoder": Workload(
        "MiniLM-size BERT encoder (384 hidden, 6 layers), batch 16 × 128, adapters on query/key/value/dense",
        _encoder,
        ("query", "key", "value", "dense"),
        lambda: {"inputs_embeds": torch.randn(16, 128, 384, requires_grad=True)},
    ),
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
        # Parameters a backward keeps are the model itself, not memory the step adds (the
        # trainable ones are counted below with their gradients and moments).
        parameters = {p.untyped_storage().data_ptr() for p in self.model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in parameters:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _call(self.model, self.inputs).square().mean()
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return (sum(storages.values()) + 4 * trainable) / 2**20  # param, grad, two moments


@dataclass
class Timings:
    """Medians over rounds: each runner's time, its time over the floor timed just before its group,
    and rankwise over PEFT within the same round."""

    seconds: dict[str, float]
    to_floor: dict[str, float]
    to_peft: dict[str, float]


# Wall-clock by default. "cpu" counts only the time this process ran (one thread: its own CPU time),
# a cross-check that other processes on a shared machine cannot inflate by taking the cores away.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(runner: Runner, action: str, clock: Callable[[], float]) -> float:
    # An untimed call first: switching between models leaves caches and the allocator cold, which
    # would charge each case for its neighbour's memory traffic.
    getattr(runner, action)()
    start = clock()
    getattr(runner, action)()
    return clock() - start


def _timings(
    runners: dict[str, Runner], groups: list[list[str]], action: str, rounds: int, clock: Callable[[], float]
) -> Timings:
    for runner in runners.values():  # warm-up
        getattr(runner, action)()
    seconds: dict[str, list[float]] = {key: [] for key in runners}
    to_floor: dict[str, list[float]] = {key: [] for key in runners}
    to_peft: dict[str, list[float]] = {}
    for _ in range(rounds):
        for group in groups:
            floor = _timed(runners["floor"], action, clock)
            seconds["floor"].append(floor)
            times = {key: _timed(runners[key], action, clock) for key in group}
            for key, elapsed in times.items():
                seconds[key].append(elapsed)
                to_floor[key].append(elapsed / floor)
                theirs = "peft:" + key.partition(":")[2]
                if key.startswith("rw:") and theirs in times:
                    to_peft.setdefault(key, []).append(elapsed / times[theirs])
    return Timings(
        {key: statistics.median(values) for key, values in seconds.items() if values},
        {key: statistics.median(values) for key, values in to_floor.items() if values},
        {key: statistics.median(values) for key, values in to_peft.items()},
    )


def run_workload(
    key: str, rounds: int, methods: set[str] | None, clock: Callable[[], float] = time.perf_counter
) -> str:
    workload = WORKLOADS[key]
    torch.manual_seed(0)
    base = workload.build()
    base.requires_grad_(False)
    inputs = workload.make_input()
    runners = {"floor": Runner(base, inputs)}
    groups: list[list[str]] = []  # per case: rankwise, PEFT, merged
    for case in _cases():
        if methods and case.method not in methods:
            continue
        group = [f"rw:{case.label}"]
        runners[group[0]] = Runner(rw.adapt(copy.deepcopy(base), case.ours(workload.targets)), inputs)
        if peft is not None and case.theirs is not None:
            group.append(f"peft:{case.label}")
            runners[group[-1]] = Runner(
                peft.get_peft_model(copy.deepcopy(base), case.theirs(list(workload.targets))), inputs
            )
        if _mergeable(case):
            group.append(f"merged:{case.label}")
            runners[group[-1]] = Runner(rw.merge(copy.deepcopy(runners[group[0]].model)), inputs)
        groups.append(group)
    trained = {k: r for k, r in runners.items() if not k.startswith("merged:")}
    train = _timings(trained, [[k for k in group if k in trained] for group in groups], "train_step", rounds, clock)
    infer = _timings(runners, groups, "infer", rounds, clock)
    flops = {k: r.flops() for k, r in trained.items()}
    memory = {k: r.memory_mb() for k, r in trained.items()}

    lines = [
        f"### {workload.name}",
        "",
        (
            f"Floor: train step {1e3 * train.seconds['floor']:.1f} ms, "
            f"inference {1e3 * infer.seconds['floor']:.1f} ms, "
            f"{memory['floor']:.0f} MB kept for backward."
        ),
        "",
        (
            "| method | train ms | train / floor | FLOP limit | train / limit | infer / floor (merged) | memory MB "
            "| PEFT train / floor | rankwise / PEFT train | PEFT memory MB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in _cases():
        ours = f"rw:{case.label}"
        if ours not in train.seconds:
            continue
        limit = flops[ours] / flops["floor"]
        ratio = train.to_floor[ours]
        merged = f" ({infer.to_floor[f'merged:{case.label}']:.2f})" if f"merged:{case.label}" in infer.to_floor else ""
        theirs = f"peft:{case.label}"
        peft_cols = (
            f"{train.to_floor[theirs]:.2f} | **{train.to_peft[ours]:.2f}** | {memory[theirs]:.0f}"
            if theirs in train.seconds
            else "— | — | —"
        )
        lines.append(
            f"| {case.label} | {1e3 * train.seconds[ours]:.1f} | {ratio:.2f} | {limit:.2f} | {ratio / limit:.2f} | "
            f"{infer.to_floor[ours]:.2f}{merged} | {memory[ours]:.0f} | {peft_cols} |"
        )
    return "\n".join(lines)


@dataclass
class MixedRunner(Runner):
    """Inference with each example of the batch on its own adapter (``rw.per_example``)."""

    names: list[str | None] = field(default_factory=list)

    def infer(self) -> None:
        with torch.no_grad(), rw.per_example(self.model, self.names):
            _call(self.model, self.inputs)


def run_named(key: str, rounds: int, clock: Callable[[], float] = time.perf_counter) -> str:
    """Named adapters (LoRA r=8 on the workload's targets), each ratio paired with its baseline
    timed just before it: 8 adapters with one active over only that adapter (train step), and 4
    adapters over a batch split between them (``rw.per_example``, 4 rows each for a batch of 16)
    over one adapter on the whole batch (inference)."""
    workload = WORKLOADS[key]
    torch.manual_seed(0)
    base = workload.build()
    base.requires_grad_(False)
    inputs = workload.make_input()
    batch = next(iter(inputs.values())).shape[0]
    config = rw.LoRAConfig(rank=8, targets=workload.targets)

    def holding(count: int) -> nn.Module:
        torch.manual_seed(1)
        model = rw.adapt(copy.deepcopy(base), config, name="a0")
        for i in range(1, count):
            rw.adapt(model, config, name=f"a{i}")
        for name, p in model.named_parameters():  # B = 0 at init: give every adapter an update
            if ".adapters." in name and name.endswith(".B"):
                nn.init.normal_(p, std=0.01)
        return model

    # _timings pairs each key with the "floor" runner; here the floor is the one-adapter model.
    single = Runner(holding(1), inputs)
    train = _timings({"floor": single, "eight": Runner(holding(8), inputs)}, [["eight"]], "train_step", rounds, clock)
    names: list[str | None] = [f"a{i % 4}" for i in range(batch)]
    mixed = MixedRunner(holding(4), inputs, names=names)
    infer = _timings({"floor": single, "mixed": mixed}, [["mixed"]], "infer", rounds, clock)
    return "\n".join(
        [
            f"### Named adapters: {workload.name}, LoRA r=8",
            "",
            "| measurement | baseline ms | ms | ratio | target |",
            "|---|---|---|---|---|",
            (
                f"| train step, 8 adapters held, 1 active / only that adapter | {1e3 * train.seconds['floor']:.1f} | "
                f"{1e3 * train.seconds['eight']:.1f} | **{train.to_floor['eight']:.3f}** | ≤ 1.05 |"
            ),
            (
                f"| inference, batch {batch} split over 4 adapters (per_example) / 1 adapter on the whole batch | "
                f"{1e3 * infer.seconds['floor']:.1f} | {1e3 * infer.seconds['mixed']:.1f} | "
                f"**{infer.to_floor['mixed']:.3f}** | ≤ 1.5 |"
            ),
        ]
    )


def _mergeable(case: Case) -> bool:
    from rankwise.core import registry

    return registry.get(case.method).module_class.mergeable


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            model = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def _write(path: str, report: str, section: str) -> None:
    """Replace the ``section`` block of ``path`` (between its markers), so prose around it and other
    sections survive a rerun; a file without this section gets it appended."""
    begin, end = f"<!-- speed.py {section}: begin -->", f"<!-- speed.py {section}: end -->"
    block = f"{begin}\n{report}{end}\n"
    try:
        with open(path) as file:
            text = file.read()
    except FileNotFoundError:
        text = ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        tail = rest.partition(end)[2]
        text = head + block + tail.removeprefix("\n")
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + block
    with open(path, "w") as file:
        file.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", help="registry names to include (default: all)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall-clock, or this process's CPU time (a cross-check on a shared machine, with --threads 1)",
    )
    parser.add_argument("--named", action="store_true", help="measure named adapters (run_named) instead")
    parser.add_argument("--out", help="write the markdown report here as well")
    parser.add_argument(
        "--section", default="results", help="in --out, replace only this section's block (default: results)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    methods = set(args.methods) if args.methods else None
    run = (
        (lambda key: run_named(key, args.rounds, CLOCKS[args.clock]))
        if args.named
        else (lambda key: run_workload(key, args.rounds, methods, CLOCKS[args.clock]))
    )
    sections = [run(key) for key in args.workloads]
    header = (
        f"Run {datetime.date.today()} on {_machine()} ({platform.machine()}), torch {torch.__version__}, "
        f"PEFT {peft.__version__ if peft else '—'}, {args.threads} thread{'s' if args.threads != 1 else ''}, fp32, "
        f"{args.clock} time, medians of {args.rounds} rounds, "
        f"each ratio paired with the floor (or PEFT) timed just before it. Load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other processes on the machine).\n\n"
        f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`\n"
    )
    report = header + "\n" + "\n\n".join(sections) + "\n"
    print(report)
    if args.out:
        _write(args.out, report, args.section)


if __name__ == "__main__":
    main()
