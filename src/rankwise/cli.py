"""``rankwise``: list the methods, run the benchmark, inspect and merge adapter checkpoints.

    rankwise list
    rankwise bench --preset quick
    rankwise bench --model my-model/ --data reviews.csv --task classification
    rankwise inspect runs/adapter
    rankwise merge --model base-model/ --adapter runs/adapter --out merged-model/
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import safetensors
import torch

import rankwise as rw
from rankwise.core import registry
from rankwise.core.checkpoint import TENSORS_FILE


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
    options = {"--text-column": args.text_column, "--label-column": args.label_column,
               "--targets": args.targets, "--length": args.length}
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
        task = task_from_files(args.model, args.data, args.task, text_column=args.text_column or "text",
                               label_column=args.label_column or "label", targets=args.targets, length=args.length)
        print(f"{task.name}: {task.targets_note}")
        tasks = [register_task(task).name]
    try:
        folder = run_bench(out, preset, tasks=tasks, methods=args.methods, seeds=args.seeds, budget=args.budget,
                           device=args.device, progress=not args.no_progress)
    except AssetMissing as missing:
        print(f"rankwise bench: {missing}", file=sys.stderr)
        return 1
    print((folder / "results.md").read_text())
    print(f"results, report and plots in {folder}")
    return 0


def _check_folder(option: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder (nothing was written)")


def _check_device(name: str) -> None:
    """Refuse a device this machine cannot use before anything is written."""
    try:
        torch.empty(0, device=torch.device(name))
    # torch.device raises RuntimeError for an unknown type; allocating raises AssertionError
    # where torch was built without CUDA, NotImplementedError for a backend it lacks.
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        raise ValueError(f"--device {name!r} cannot be used here: {str(error).splitlines()[0]}") from None


def inspect(args: argparse.Namespace) -> None:
    """``rankwise inspect FOLDER``: an adapter checkpoint's method, config, layers and size."""
    meta, config = rw.read_adapter_config(args.folder)
    tensors = Path(args.folder) / TENSORS_FILE
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


def merge(args: argparse.Namespace) -> None:
    """``rankwise merge``: fold an adapter into a transformers model folder and save the result."""
    import transformers  # an optional dependency; only this command needs it

    _check_folder("--out", args.out)
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} exists and is not empty; choose a new folder (nothing was written)")
    if not (args.model / "config.json").is_file():
        raise ValueError(f"--model {args.model} is not a transformers model folder: it has no config.json "
                         "(nothing was written)")

    config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
    if not config.architectures:
        raise ValueError(f"{args.model}/config.json names no architecture; save the model with save_pretrained")
    model_class = getattr(transformers, config.architectures[0], None)
    if model_class is None:
        raise ValueError(f"{args.model}: architecture {config.architectures[0]!r} is not a transformers class")
    model = model_class.from_pretrained(args.model, local_files_only=True, dtype="auto")
    model = rw.unwrap(rw.load_adapter(model, args.adapter), merge=True)
    assert isinstance(model, transformers.PreTrainedModel)  # adapters wrap its layers, never the model itself
    model.save_pretrained(args.out)
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
    run.add_argument("--preset", choices=("quick", "standard", "full"), default="quick",
                     help="quick: all methods, one task, one seed (minutes); standard: every task, 3 seeds, "
                          "hundreds of steps, a wide lr sweep (hours); full: every task, 3 seeds, an lr sweep")
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
    own.add_argument("--data", type=Path, help=".csv, .tsv or .jsonl (text, label, optional split column); "
                                               "for --task lm also .txt, documents separated by blank lines")
    own.add_argument("--task", choices=("classification", "lm"),
                     help="classification: a new head on AutoModelForSequenceClassification; lm: AutoModelForCausalLM")
    own.add_argument("--text-column", help="the text column (default: text)")
    own.add_argument("--label-column", help="the label column (default: label)")
    own.add_argument("--targets", nargs="+",
                     help="layers to adapt: module names or re: patterns (default: every square linear layer "
                          "outside the head, printed)")
    own.add_argument("--length", type=int, help="tokens per sequence (default: the preset's)")
    run.set_defaults(run=bench)

    show = commands.add_parser("inspect", help="an adapter checkpoint's method, config, modules and size")
    show.add_argument("folder", type=Path)
    show.set_defaults(run=inspect)

    fold = commands.add_parser("merge", help="fold an adapter into a transformers model and save it (safetensors)")
    fold.add_argument("--model", type=Path, required=True, help="a transformers model folder (save_pretrained)")
    fold.add_argument("--adapter", type=Path, required=True, help="a rankwise adapter folder (save_adapter)")
    fold.add_argument("--out", type=Path, required=True, help="where the merged model is written")
    fold.set_defaults(run=merge)
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
