"""``rankwise``: list the methods, run the benchmark, inspect and merge adapter checkpoints.

    rankwise list
    rankwise bench --preset quick
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


def bench(args: argparse.Namespace) -> None:
    """``rankwise bench``: run or resume a benchmark, then print its report."""
    # Imported here: the harness pulls in matplotlib and tqdm, which the other commands don't need.
    from rankwise.bench import PRESETS, run_bench

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    out = args.out or Path("bench-out") / preset.name
    _check_folder("--out", out)
    _check_device(args.device)
    folder = run_bench(out, preset, tasks=args.tasks, methods=args.methods, seeds=args.seeds, budget=args.budget,
                       device=args.device, progress=not args.no_progress)
    print((folder / "results.md").read_text())
    print(f"results, report and plots in {folder}")


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
    run.add_argument("--preset", choices=("quick", "full"), default="quick",
                     help="quick: all methods, one task, one seed (minutes); full: every task, 3 seeds, an lr sweep")
    run.add_argument("--tasks", nargs="+", help="task names (default: the preset's)")
    run.add_argument("--methods", nargs="+", help="methods and references (default: all)")
    run.add_argument("--seeds", nargs="+", type=int, help="run seeds (default: the preset's)")
    run.add_argument("--budget", type=int, help="adapter parameters per task (default: LoRA rank 8 on its targets)")
    run.add_argument("--out", type=Path, help="results folder; an interrupted run resumes (default: bench-out/PRESET)")
    run.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        args.run(args)
    except ValueError as error:  # bad input (CheckpointError is one): a message, not a traceback
        print(f"rankwise {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
