"""``rankwise``: list the methods, run the benchmark, inspect and merge adapter checkpoints, compress
a model.

    rankwise list
    rankwise bench --preset quick
    rankwise bench --model my-model/ --data reviews.csv --task classification
    rankwise inspect runs/adapter
    rankwise merge --model base-model/ --adapter runs/adapter --out merged-model/
    rankwise compress --model base-model/ --params 0.9 --calibration text.txt --heal-steps 200 --out small/
    rankwise inspect small/
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch

import rankwise as rw
from rankwise.compress.checkpoint import COMPRESSION_LAYOUT, read_layout, transformers_class
from rankwise.core import registry
from rankwise.core.checkpoint import TENSORS_FILE, saved_adapters
from rankwise.core.checks import check_number

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def list_methods(args: argparse.Namespace) -> None:
    """``rankwise list``: each registered method and its one-line summary."""
    names = rw.methods()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {registry.get(name).summary}")


def bench(args: argparse.Namespace) -> int:
    """``rankwise bench``: run or resume a benchmark, then print its report. Returns 1 when no task
    could run (their assets are missing)."""
    # Imported here: the harness pulls in matplotlib and tqdm, which the other commands don't need.
    from rankwise.bench import PRESETS, AssetMissing, register_task, run_bench, task_from_files

    own = {"--model": args.model, "--data": args.data, "--task": args.task}
    if any(own.values()) and not all(own.values()):
        missing = [name for name, value in own.items() if not value]
        raise ValueError(f"--model, --data and --task go together; add {' '.join(missing)}")
    if args.model and args.tasks:
        raise ValueError("--tasks runs built-in tasks, --model/--data your own; give one or the other")
    options = {
        "--text-column": args.text_column,
        "--label-column": args.label_column,
        "--targets": args.targets,
        "--length": args.length,
    }
    if not args.model and any(value is not None for value in options.values()):
        given = [name for name, value in options.items() if value is not None]
        raise ValueError(f"{' '.join(given)} apply to your own data: add --model DIR --data FILE --task KIND")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    out = args.out or Path("bench-out") / preset.name
    _check_folder("--out", out)
    _check_device(args.device)
    tasks = args.tasks
    if args.model:
        task = task_from_files(
            args.model,
            args.data,
            args.task,
            text_column=args.text_column or "text",
            label_column=args.label_column or "label",
            targets=args.targets,
            length=args.length,
        )
        print(f"{task.name}: {task.targets_note}")
        tasks = [register_task(task).name]
    try:
        folder = run_bench(
            out,
            preset,
            tasks=tasks,
            methods=args.methods,
            seeds=args.seeds,
            budget=args.budget,
            device=args.device,
            progress=not args.no_progress,
        )
    except AssetMissing as missing:
        print(f"rankwise bench: {missing}", file=sys.stderr)
        return 1
    print((folder / "results.md").read_text())
    print(f"results, report and plots in {folder}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """``rankwise compare``: the across-tasks table of several benchmark folders."""
    from rankwise.bench import TASKS
    from rankwise.bench.report import compare_folders

    text = compare_folders(args.folders, TASKS)
    if args.out:
        args.out.write_text(text)
        print(f"written to {args.out}")
    else:
        print(text, end="")
    return 0


def _check_folder(option: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder (nothing was written)")


def _check_new_folder(option: str, path: Path) -> None:
    _check_folder(option, path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{option} {path} exists and is not empty; choose a new folder (nothing was written)")


def _check_device(name: str) -> None:
    """Refuse a device this machine cannot use before anything is written."""
    try:
        torch.empty(0, device=torch.device(name))
    # torch.device raises RuntimeError for an unknown type; allocating raises AssertionError
    # where torch was built without CUDA, NotImplementedError for a backend it lacks.
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        raise ValueError(f"--device {name!r} cannot be used here: {str(error).splitlines()[0]}") from None


def inspect(args: argparse.Namespace) -> None:
    """``rankwise inspect FOLDER``: an adapter checkpoint's method, config, layers and size (each
    adapter's, for a folder of several, one per subfolder), or a compressed model's low-rank layers
    and their ranks."""
    if (Path(args.folder) / COMPRESSION_LAYOUT).is_file():
        _inspect_compressed(args.folder)
        return
    several = saved_adapters(args.folder)
    if "" in several or not several:
        _inspect_adapter(Path(args.folder))
        return
    print(f"adapters: {len(several)} ({', '.join(several)})")
    for name, folder in several.items():
        print(f"\nadapter {name} ({folder.name}/):")
        _inspect_adapter(folder)


def _inspect_adapter(folder: Path) -> None:
    meta, config = rw.read_adapter_config(folder)
    tensors = folder / TENSORS_FILE
    if not tensors.is_file():
        raise rw.CheckpointError(f"{tensors} does not exist")
    module_class = registry.get(meta["method"]).module_class
    written_by = f"  (saved by rankwise {meta['rankwise_version']})" if "rankwise_version" in meta else ""
    print(f"method: {meta['method']}{written_by}")
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    rows, total = [], 0
    for path, entry in meta["modules"].items():
        layer = config.from_dict({**config.to_dict(), **entry["config"]})
        params = module_class.num_params(entry["in_features"], entry["out_features"], layer)
        total += params
        overrides = ", ".join(f"{k}={v}" for k, v in entry["config"].items())
        shape = f"{entry['in_features']} -> {entry['out_features']}"
        rows.append((path, entry["base"], shape, f"{params:,}", overrides))
    header = ("module", "base", "in -> out", "params", "own config")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"modules: {len(rows)}")
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"adapter parameters: {total:,}")
    if meta["trainable_modules"]:
        try:
            with safetensors.safe_open(tensors, framework="pt") as file:
                # safe_open has keys() but is not iterable, so `in file` would fail.
                shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118
        except safetensors.SafetensorError as error:
            raise rw.CheckpointError(f"{tensors} is not a readable safetensors file: {error}") from None
        for path in meta["trainable_modules"]:
            values = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(path + "."))
            print(f"trainable module {path}: {values:,} values saved")


def _inspect_compressed(folder: Path) -> None:
    layout = read_layout(folder)
    rows = []
    for path, entry in layout["layers"].items():
        size_in, size_out = (
            (entry["in_features"], entry["out_features"])
            if "in_features" in entry
            else (entry["in_channels"], entry["out_channels"])
        )
        rows.append((path, entry["type"], f"{size_in} -> {size_out}", str(entry["rank"])))
    header = ("layer", "type", "in -> out", "rank")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"compressed model (saved by rankwise {layout['rankwise_version']}): {len(rows)} low-rank layers")
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def compress(args: argparse.Namespace) -> None:
    """``rankwise compress``: LoRD with ranks allocated under one budget on a transformers model folder,
    then (``--heal-steps``) a short fine-tune of the factors on the calibration text."""
    from tqdm.auto import tqdm  # a dependency of transformers, which this command needs

    # Every check that needs no model comes first, so bad input costs nothing and writes nothing.
    options = (
        ("--params", args.params, 0, True),
        ("--heal-steps", args.heal_steps, 0, False),
        ("--block-size", args.block_size, 2, False),
    )
    for option, value, low, low_open in options:
        try:
            check_number(
                "",
                option,
                value,
                low,
                1 if option == "--params" else None,
                low_open=low_open,
                integer=option != "--params",
            )
        except ValueError as error:
            raise ValueError(f"{str(error).removeprefix(': ')} (nothing was written)") from None
    _check_new_folder("--out", args.out)
    if not args.calibration.is_file():
        raise ValueError(f"--calibration {args.calibration} is not a file (nothing was written)")
    text = args.calibration.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--calibration {args.calibration} is empty; give in-domain text (nothing was written)")
    model_class = _model_class(args.model)

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    pieces = [ids[i : i + args.block_size] for i in range(0, len(ids), args.block_size)]
    blocks = [{"input_ids": b[None], "labels": b[None]} for b in pieces if len(b) >= 2]
    if not blocks:
        raise ValueError(f"--calibration {args.calibration} gives fewer than 2 tokens (nothing was written)")
    model = model_class.from_pretrained(args.model, local_files_only=True, dtype="auto")
    with tqdm(total=len(blocks) + 1 + args.heal_steps, unit="step", disable=args.no_progress) as bar:

        def healed(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")

        bar.set_description("calibration")
        statistics = rw.compress.calibrate(model, _counted(blocks, bar), targets=args.targets)
        bar.set_description("allocation")
        report = rw.compress.lord(model, targets=args.targets, params=args.params, calibration=statistics)
        bar.update()
        if args.heal_steps:
            bar.set_description("healing")
            rw.compress.heal(model, blocks, steps=args.heal_steps, lr=args.heal_lr, progress=healed)
    rw.compress.save_pretrained(model, args.out)
    tokenizer.save_pretrained(args.out)
    print(report)
    print(f"compressed model in {args.out}; load it with rankwise.compress.from_pretrained")


def _model_class(folder: Path) -> type[PreTrainedModel]:
    try:
        return transformers_class(folder)[0]
    except ValueError as error:
        raise ValueError(f"--model {error} (nothing was written)") from None


def _counted(items: list[dict[str, torch.Tensor]], bar: Any) -> Iterator[dict[str, torch.Tensor]]:
    for item in items:
        yield item
        bar.update()


def merge(args: argparse.Namespace) -> None:
    """``rankwise merge``: fold an adapter into a transformers model folder and save the result."""
    import transformers  # an optional dependency; only this command needs it

    _check_new_folder("--out", args.out)
    model_class = _model_class(args.model)
    model = model_class.from_pretrained(args.model, local_files_only=True, dtype="auto")
    merged = rw.unwrap(rw.load_adapter(model, args.adapter), merge=True)
    assert isinstance(merged, transformers.PreTrainedModel)  # adapters wrap its layers, never the model itself
    merged.save_pretrained(args.out)
    if (Path(args.model) / "tokenizer_config.json").is_file():
        transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True).save_pretrained(args.out)
    print(f"merged {rw.read_adapter_config(args.adapter)[0]['method']} adapter into {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankwise", description="List the methods, run the benchmark, inspect and merge adapter checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="the registered methods, one line each").set_defaults(run=list_methods)

    run = commands.add_parser("bench", help="benchmark methods on pretrained models at equal parameter budgets")
    run.add_argument(
        "--preset",
        choices=("quick", "standard", "full"),
        default="quick",
        help="quick: all methods, one task, one seed (minutes); standard: every task, 3 seeds, "
        "hundreds of steps, a wide lr sweep (hours); full: every task, 3 seeds, an lr sweep",
    )
    run.add_argument("--tasks", nargs="+", help="task names (default: the preset's)")
    run.add_argument("--methods", nargs="+", help="methods and references (default: all)")
    run.add_argument("--seeds", nargs="+", type=int, help="run seeds (default: the preset's)")
    run.add_argument("--budget", type=int, help="adapter parameters per task (default: LoRA rank 8 on its targets)")
    run.add_argument("--out", type=Path, help="results folder; an interrupted run resumes (default: bench-out/PRESET)")
    run.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    own = run.add_argument_group("your own model and data (instead of --tasks)")
    own.add_argument("--model", type=Path, help="a transformers model folder (save_pretrained), tokenizer included")
    own.add_argument(
        "--data",
        type=Path,
        help=".csv, .tsv or .jsonl (text, label, optional split column); "
        "for --task lm also .txt, documents separated by blank lines",
    )
    own.add_argument(
        "--task",
        choices=("classification", "lm"),
        help="classification: a new head on AutoModelForSequenceClassification; lm: AutoModelForCausalLM",
    )
    own.add_argument("--text-column", help="the text column (default: text)")
    own.add_argument("--label-column", help="the label column (default: label)")
    own.add_argument(
        "--targets",
        nargs="+",
        help="layers to adapt: module names or re: patterns (default: every square linear layer "
        "outside the head, printed)",
    )
    own.add_argument("--length", type=int, help="tokens per sequence (default: the preset's)")
    run.set_defaults(run=bench)

    across = commands.add_parser(
        "compare", help="compare methods across the tasks of several benchmark folders (share of the best gain)"
    )
    across.add_argument("folders", type=Path, nargs="+", help="folders that rankwise bench --out wrote")
    across.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")
    across.set_defaults(run=compare)

    show = commands.add_parser("inspect", help="an adapter checkpoint's method, config, modules and size")
    show.add_argument("folder", type=Path)
    show.set_defaults(run=inspect)

    fold = commands.add_parser("merge", help="fold an adapter into a transformers model and save it (safetensors)")
    fold.add_argument("--model", type=Path, required=True, help="a transformers model folder (save_pretrained)")
    fold.add_argument("--adapter", type=Path, required=True, help="a rankwise adapter folder (save_adapter)")
    fold.add_argument("--out", type=Path, required=True, help="where the merged model is written")
    fold.set_defaults(run=merge)

    shrink = commands.add_parser("compress", help="LoRD under one parameter budget on a transformers model, healed")
    shrink.add_argument("--model", type=Path, required=True, help="a transformers model folder (save_pretrained)")
    shrink.add_argument(
        "--params", type=float, required=True, help="fraction of the target layers' parameters to keep, in (0, 1]"
    )
    shrink.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="a UTF-8 text file of in-domain text: calibration, and healing data",
    )
    shrink.add_argument("--out", type=Path, required=True, help="a new folder for the compressed model")
    shrink.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        help="layer names or re: patterns (default: every linear layer but the LM head)",
    )
    shrink.add_argument("--heal-steps", type=int, default=0, help="fine-tune steps on the factors after (default 0)")
    shrink.add_argument("--heal-lr", type=float, default=1e-4, help="peak learning rate of healing (default 1e-4)")
    shrink.add_argument("--block-size", type=int, default=256, help="tokens per calibration sequence (default 256)")
    shrink.add_argument("--no-progress", action="store_true", help="no progress bar")
    shrink.set_defaults(run=compress)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rankwise`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ValueError as error:  # bad input (CheckpointError is one): a message, not a traceback
        print(f"rankwise {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
