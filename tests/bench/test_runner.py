"""The runner's machinery on the built-in synthetic task: rows, sweep, resume, skips, report files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import rankwise as rw
from rankwise.bench import runner
from rankwise.bench.budget import default_budget
from rankwise.bench.tasks import TASKS, AssetMissing, Friends, Sizes, Synthetic, Task
from rankwise.core import registry
from rankwise.core.delta import Adapter

pytestmark = pytest.mark.slow  # whole benchmark runs, if tiny ones

MakePreset = Callable[..., runner.Preset]


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _by_method(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["method"]: row for row in rows}


def test_one_selected_row_per_method_with_counts_metrics_report_and_plots(
    tmp_path: Path, tiny: Sizes, make_preset: MakePreset
) -> None:
    runner.run_bench(tmp_path, make_preset(), methods=("lora", "frozen", "full"), progress=False)
    rows = _by_method(_rows(tmp_path))
    assert set(rows) == {"lora", "frozen", "full"}
    task = Synthetic(tiny)
    task.prepare()
    budget = default_budget(task.pretrained, task.targets, task.head)
    head = 32 * 4 + 4
    assert rows["lora"]["adapter_params"] == str(budget) and rows["lora"]["budget_matched"] == "yes"
    assert rows["lora"]["trainable_params"] == str(budget + head)
    assert (rows["frozen"]["adapter_params"], rows["frozen"]["trainable_params"]) == ("0", str(head))
    assert rows["full"]["adapter_params"] == str(2 * (32 * 32 + 32))
    for row in rows.values():
        assert (row["selected"], row["status"], row["steps"], row["seed"]) == ("yes", "ok", str(tiny.steps), "0")
        assert 0 <= float(row["test_accuracy"]) <= 1 and 0 <= float(row["test_macro_f1"]) <= 1
        assert row["val_accuracy"] == ""  # one learning rate: nothing to choose, no validation pass
        assert float(row["train_time_s"]) >= 0 and float(row["peak_memory_mb"]) > 0
    report = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in report for name in rows)
    for plot in ("synthetic_metric_vs_params.png", "synthetic_loss.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    assert sorted(c["method"] for c in curves) == ["frozen", "full", "lora"]
    assert all(len(c["losses"]) == tiny.steps for c in curves)


def test_every_registered_method_and_the_special_recipes_have_a_row() -> None:
    table = runner.recipes()
    assert set(rw.methods()) <= set(table)
    assert {"lora_pro", "lora_plus", "frozen", "full"} <= set(table)


def test_a_method_s_row_carries_what_its_module_declares() -> None:
    table = runner.recipes()
    for name in rw.methods():
        module_class = registry.get(name).module_class
        assert table[name].allocator is module_class.allocator, name
        assert (table[name].initialize is None) == (module_class.initializer is None), name
    # Some method declares each: otherwise this test checks nothing.
    assert any(table[name].allocator for name in rw.methods())
    assert any(table[name].initialize for name in rw.methods())


def test_a_new_method_s_declarations_reach_its_row_and_its_config(
    monkeypatch: pytest.MonkeyPatch, fake_methods: dict[str, str], tiny: Sizes
) -> None:
    """Registering a method with declarations is all it takes: the runner names no method."""
    stride = registry.get(fake_methods["stride"]).module_class

    def allocator(model: torch.nn.Module, *, total_steps: int) -> None:
        raise AssertionError("not called here")

    def initializer(model: torch.nn.Module, batches: object, *, loss_fn: object, seed: int) -> None:
        raise AssertionError("not called here")

    monkeypatch.setattr(stride, "allocator", allocator)
    monkeypatch.setattr(stride, "initializer", staticmethod(initializer))
    monkeypatch.setattr(
        stride, "for_run", classmethod(lambda cls, config, steps: dataclasses.replace(config, block=steps))
    )
    recipe = runner.recipes()[fake_methods["stride"]]
    assert recipe.allocator is allocator and recipe.initialize.args == (initializer,)
    task = Synthetic(tiny)
    config = rw.make_config(fake_methods["stride"], targets=task.targets)
    assert recipe.configured(config, task).block == tiny.steps
    assert recipe.configured(config, task, 3).block == 3  # a proxy sweep's shorter run


def test_the_sweep_picks_the_best_validation_factor_and_later_seeds_use_it(
    tmp_path: Path, make_preset: MakePreset
) -> None:
    preset = make_preset(seeds=(0, 1), lr_factors=(0.01, 1.0, 10.0))
    runner.run_bench(tmp_path, preset, methods=("full",), progress=False)
    rows = _rows(tmp_path)
    sweep = [row for row in rows if row["seed"] == "0"]
    assert sorted(row["lr_factor"] for row in sweep) == ["0.01", "1", "10"]
    assert all(row["val_accuracy"] for row in sweep)
    (chosen,) = [row for row in sweep if row["selected"] == "yes"]
    assert float(chosen["val_accuracy"]) == max(float(row["val_accuracy"]) for row in sweep)
    assert chosen["test_accuracy"] and not any(row["test_accuracy"] for row in sweep if row is not chosen)
    (later,) = [row for row in rows if row["seed"] == "1"]
    assert (later["lr_factor"], later["selected"]) == (chosen["lr_factor"], "yes") and later["test_accuracy"]


def test_a_second_call_runs_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_preset: MakePreset
) -> None:
    runner.run_bench(tmp_path, make_preset(), methods=("lora", "full"), progress=False)
    calls = []
    train = runner.train
    monkeypatch.setattr(runner, "train", lambda *args, **kwargs: calls.append(args[1].name) or train(*args, **kwargs))
    runner.run_bench(tmp_path, make_preset(), methods=("lora", "full"), seeds=(0, 1), progress=False)
    assert sorted(calls) == ["full", "lora"]
    rows = _rows(tmp_path)
    runs = sorted((row["method"], row["seed"]) for row in rows)
    assert runs == [("full", "0"), ("full", "1"), ("lora", "0"), ("lora", "1")]


def test_an_interrupted_run_resumes_from_the_rows_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_preset: MakePreset
) -> None:
    train = runner.train
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(tmp_path, make_preset(), methods=("lora", "frozen", "full"), progress=False)
    assert [row["method"] for row in _rows(tmp_path)] == ["lora"]
    monkeypatch.setattr(runner, "train", train)
    runner.run_bench(tmp_path, make_preset(), methods=("lora", "frozen", "full"), progress=False)
    assert [row["method"] for row in _rows(tmp_path)] == ["lora", "frozen", "full"]


def test_results_of_other_settings_are_not_mixed(tmp_path: Path, tiny: Sizes, make_preset: MakePreset) -> None:
    runner.run_bench(tmp_path, make_preset(), methods=("frozen",), progress=False)
    longer = make_preset(sizes=dataclasses.replace(tiny, steps=7))
    with pytest.raises(ValueError, match=r"other settings.*sizes"):
        runner.run_bench(tmp_path, longer, methods=("frozen",), progress=False)


def test_a_method_that_cannot_adapt_the_task_is_recorded_and_listed(
    tmp_path: Path, fake_methods: dict[str, str], make_preset: MakePreset
) -> None:
    runner.run_bench(tmp_path, make_preset(), methods=(fake_methods["conv_only"],), progress=False)
    (row,) = _rows(tmp_path)
    assert row["status"] == "unsupported" and "does not support" in row["note"] and not row["test_accuracy"]
    assert f"- {fake_methods['conv_only']}: " in (tmp_path / "results.md").read_text()


class Missing(Synthetic):
    """A task whose asset is not installed."""

    name = "missing"

    def _load(self):
        raise AssetMissing("the data is not installed: pip install some-data")


def test_a_task_whose_asset_is_missing_is_skipped_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Sizes
) -> None:
    monkeypatch.setitem(TASKS, "missing", Missing)
    preset = runner.Preset(
        "test",
        tasks=("missing", "synthetic"),
        seeds=(0,),
        lr_factors=(1.0,),
        sizes={"missing": tiny, "synthetic": tiny},
    )
    runner.run_bench(tmp_path, preset, methods=("lora",), progress=False)
    assert "skipping task missing: the data is not installed: pip install some-data" in capsys.readouterr().out
    assert [(row["task"], row["method"]) for row in _rows(tmp_path)] == [("synthetic", "lora")]


def test_when_every_task_is_skipped_the_run_fails_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Sizes
) -> None:
    monkeypatch.setitem(TASKS, "missing", Missing)
    preset = runner.Preset("test", tasks=("missing",), seeds=(0,), lr_factors=(1.0,), sizes={"missing": tiny})
    with pytest.raises(AssetMissing, match=r"no task could run; install what they need: missing: .*pip install some"):
        runner.run_bench(tmp_path, preset, methods=("lora",), progress=False)
    assert not (tmp_path / "results.csv").exists()


def test_a_non_finite_loss_stops_the_run_and_marks_it_diverged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_preset: MakePreset
) -> None:
    class Exploding(Synthetic):
        calls = 0

        def loss(self, model, batch):
            Exploding.calls += 1
            loss = super().loss(model, batch)
            return loss * float("nan") if Exploding.calls > 2 else loss

    monkeypatch.setitem(TASKS, "synthetic", Exploding)
    runner.run_bench(tmp_path, make_preset(), methods=("lora",), progress=False)
    (row,) = _rows(tmp_path)
    assert (row["status"], row["steps"], row["note"]) == ("diverged", "2", "non-finite loss at step 2")


def test_training_steps_the_model_after_every_optimizer_step(monkeypatch: pytest.MonkeyPatch, tiny: Sizes) -> None:
    task = Synthetic(tiny)
    task.prepare()
    stepped = []
    monkeypatch.setattr(rw, "step", lambda model: stepped.append(model))
    recipe = runner.recipes()["lora"]
    config = rw.make_config("lora", rank=2, targets=task.targets, trainable=task.head)
    trained = runner.train(task, recipe, config, 0, 1e-2, torch.device("cpu"))
    assert len(stepped) == tiny.steps and all(model is trained.model for model in stepped)
    assert len(trained.losses) == tiny.steps


def test_the_frozen_reference_trains_only_the_head_and_full_trains_everything(tiny: Sizes) -> None:
    task = Synthetic(tiny)
    task.prepare()
    table = runner.recipes()
    before = task.pretrained.state_dict()
    frozen = runner.train(task, table["frozen"], None, 0, 1e-2, torch.device("cpu")).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], frozen[k])}
    assert changed == {"head.weight", "head.bias"}
    full = runner.train(task, table["full"], None, 0, 1e-2, torch.device("cpu")).model.state_dict()
    assert all(not torch.equal(before[k], full[k]) for k in before)


def _special(recipe: runner.Recipe) -> bool:
    """A recipe that is more than a method's config and AdamW: another optimizer, or what the
    method declares (an allocator, a start from data, a fit to the run)."""
    if recipe.method is None:
        return False
    fits_the_run = registry.get(recipe.method).module_class.for_run.__func__ is not Adapter.for_run.__func__
    return bool(recipe.allocator or recipe.initialize or recipe.optimizer is not runner.adamw or fits_the_run)


@pytest.mark.parametrize("name", [name for name, recipe in runner.recipes().items() if _special(recipe)])
def test_the_special_recipes_train(name: str, tiny: Sizes) -> None:
    task = Synthetic(dataclasses.replace(tiny, steps=12))
    task.prepare()
    recipe = runner.recipes()[name]
    sizing = runner.size_to_budget(task.pretrained, recipe.method, 512, targets=task.targets, trainable=task.head)
    trained = runner.train(task, recipe, sizing.config, 0, recipe.base_lr(task), torch.device("cpu"))
    assert trained.diverged_at is None and len(trained.losses) == 12
    assert trained.adapter > 0


def test_selection_prefers_lower_perplexity_higher_accuracy_and_ranks_a_diverged_run_last() -> None:
    def row(metric: str, value: float, status: str = "ok") -> dict[str, str]:
        return {f"val_{metric}": str(value), "status": status}

    assert runner._score(Friends, row("perplexity", 20.0)) > runner._score(Friends, row("perplexity", 30.0))
    assert runner._score(Friends, row("perplexity", 10.0, "diverged")) < runner._score(Friends, row("perplexity", 1e6))
    assert runner._score(Synthetic, row("accuracy", 0.9)) > runner._score(Synthetic, row("accuracy", 0.8))


class TinyLM(Task):
    """A task without a head, scored by perplexity: the shape of the language-model task."""

    name = "tiny-lm"
    description = "random tokens; an embedding and a linear layer"
    metrics = ("perplexity",)
    primary = "perplexity"
    higher_is_better = False
    targets = ("1",)
    full_lr = 1e-2

    def _load(self):
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
        s = self.sizes
        data = {
            split: {"ids": torch.randint(0, 10, (getattr(s, split), 6), generator=generator)}
            for split in ("train", "val", "test")
        }
        return model, data

    def loss(self, model, batch):
        logits = model(batch["ids"][:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 10), batch["ids"][:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, split, device="cpu"):
        model.eval()
        losses = [self.loss(model, batch).item() for batch in self.eval_batches(split, device)]
        return {"perplexity": float(torch.tensor(losses).mean().exp())}


def test_without_a_head_the_frozen_row_trains_nothing_and_is_the_model_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Sizes
) -> None:
    monkeypatch.setitem(TASKS, "tiny-lm", TinyLM)
    preset = runner.Preset(
        "test", tasks=("tiny-lm",), seeds=(0, 1), lr_factors=(0.5, 1.0, 2.0), sizes={"tiny-lm": tiny}
    )
    runner.run_bench(tmp_path, preset, methods=("lora", "frozen"), progress=False)
    rows = _rows(tmp_path)
    frozen = [row for row in rows if row["method"] == "frozen"]
    assert [(row["seed"], row["lr_factor"], row["steps"], row["trainable_params"]) for row in frozen] == [
        ("0", "1", "0", "0"),
        ("1", "1", "0", "0"),
    ]
    task = TinyLM(tiny)
    task.prepare()
    before = task.evaluate(task.pretrained, "test")["perplexity"]
    assert all(float(row["test_perplexity"]) == pytest.approx(before) for row in frozen)
    assert len([row for row in rows if row["method"] == "lora"]) == 4
    assert "| frozen |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "tiny-lm_metric_vs_params.png").is_file()


def test_a_proxy_sweep_trains_short_runs_then_every_seed_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Sizes, make_preset: MakePreset
) -> None:
    preset = make_preset(seeds=(0, 1), lr_factors=(0.01, 1.0, 10.0), lr_proxy=0.5)
    runner.run_bench(tmp_path, preset, methods=("full",), progress=False)
    rows = _rows(tmp_path)
    sweep = [row for row in rows if row["selected"] == "proxy"]
    assert [(row["seed"], row["lr_factor"], row["steps"]) for row in sweep] == [
        ("0", "0.01", "3"),
        ("0", "1", "3"),
        ("0", "10", "3"),
    ]  # half of the 6 steps
    assert all(row["val_accuracy"] and not row["test_accuracy"] for row in sweep)
    best = max(float(row["val_accuracy"]) for row in sweep)
    chosen = next(row["lr_factor"] for row in sweep if float(row["val_accuracy"]) == best)
    counted = [row for row in rows if row["selected"] == "yes"]
    assert [(row["seed"], row["lr_factor"], row["steps"]) for row in counted] == [
        ("0", chosen, "6"),
        ("1", chosen, "6"),
    ]
    assert all(row["test_accuracy"] for row in counted)
    curves = [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    assert [len(c["losses"]) for c in curves if c.get("proxy")] == [3, 3, 3]

    calls = []
    train = runner.train
    monkeypatch.setattr(runner, "train", lambda *args, **kwargs: calls.append(args) or train(*args, **kwargs))
    runner.run_bench(tmp_path, preset, methods=("full",), seeds=(0, 1, 2), progress=False)
    assert [args[3] for args in calls] == [2]  # only the new seed, at the factor chosen before
    with pytest.raises(ValueError, match=r"other settings \(\['lr_proxy'\]\)"):
        runner.run_bench(
            tmp_path, make_preset(seeds=(0, 1), lr_factors=(0.01, 1.0, 10.0)), methods=("full",), progress=False
        )


@pytest.mark.parametrize(
    ("peak", "swept", "chosen"),
    [
        (1e9, ["0.01", "0.1", "1", "10", "100"], "100"),  # better the larger: two steps up, the limit
        (10.0, ["0.01", "0.1", "1", "10", "100"], "10"),  # peaks one step past the grid: found, then no further
        (1e-9, ["0.0001", "0.001", "0.01", "0.1", "1"], "0.0001"),  # better the smaller: two steps down
        (0.1, ["0.01", "0.1", "1"], "0.1"),  # inside the grid: nothing more
    ],
)
def test_a_proxy_sweep_goes_past_the_grid_while_its_end_is_best(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_preset: MakePreset,
    peak: float,
    swept: list[str],
    chosen: str,
) -> None:
    # Validation accuracy made a function of the learning-rate factor alone, peaking at `peak` and
    # flat below 1e-3 (a tie there goes to the smaller rate, as every sweep's does).
    factors: list[float] = []
    train = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: factors.append(a[4] / runner.HEAD_LR) or train(*a, **k))

    def accuracy(model: torch.nn.Module, split: str, device: torch.device) -> dict[str, float]:
        distance = abs(math.log10(max(factors[-1], 1e-3)) - math.log10(peak))
        return {"accuracy": 1 / (1 + distance), "macro_f1": 0.0}

    monkeypatch.setattr(Synthetic, "evaluate", lambda self, *a: accuracy(*a))
    preset = make_preset(seeds=(0,), lr_factors=(0.01, 0.1, 1.0), lr_proxy=0.5, lr_extend=2)
    runner.run_bench(tmp_path, preset, methods=("frozen",), progress=False)
    rows = _rows(tmp_path)
    assert sorted((row["lr_factor"] for row in rows if row["selected"] == "proxy"), key=float) == swept
    assert [row["lr_factor"] for row in rows if row["selected"] == "yes"] == [chosen]
    before = len(factors)
    runner.run_bench(tmp_path, preset, methods=("frozen",), progress=False)  # resumes: nothing to run
    assert len(factors) == before


def test_an_interrupted_proxy_sweep_resumes_with_the_factor_it_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_preset: MakePreset
) -> None:
    preset = make_preset(seeds=(0,), lr_factors=(0.01, 1.0, 10.0), lr_proxy=0.5)
    train = runner.train
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 4:  # the first full-length run, after the sweep
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(tmp_path, preset, methods=("full",), progress=False)
    sweep = _rows(tmp_path)
    assert [row["selected"] for row in sweep] == ["proxy"] * 3
    chosen_lr = calls[3]
    calls.clear()
    runner.run_bench(tmp_path, preset, methods=("full",), progress=False)
    assert calls == [chosen_lr]
    assert [row["selected"] for row in _rows(tmp_path)] == ["proxy"] * 3 + ["yes"]


def test_the_standard_preset_trains_hundreds_of_steps_over_a_wide_learning_rate_grid() -> None:
    standard, quick = runner.PRESETS["standard"], runner.PRESETS["quick"]
    assert all(standard.sizes[task].steps >= 240 for task in ("tweets", "r8", "fashion"))
    assert standard.sizes["friends"].steps >= 100 and standard.kinds["lm"].steps >= 100
    assert standard.kinds["classification"].steps >= 240
    assert max(standard.lr_factors) / min(standard.lr_factors) >= 100 and 1.0 in standard.lr_factors
    assert standard.lr_proxy is not None and round(standard.lr_proxy * standard.sizes["tweets"].steps) >= 50
    assert standard.cache_frozen_layers
    for sizes in (*standard.sizes.values(), *standard.kinds.values()):
        assert sizes.train >= sizes.steps * sizes.batch_size  # each run sees its training subset once
    # The quick preset stays a few minutes: one task, one seed, one rate, two dozen steps.
    assert (quick.tasks, quick.seeds, quick.lr_factors, quick.sizes["tweets"].steps) == (("tweets",), (0,), (1.0,), 24)


def test_the_budget_flag_is_judged_on_the_count_that_trained(tmp_path: Path, make_preset: MakePreset) -> None:
    # At a budget of 256 the search gives GoRA rank 2 (256 parameters, matched), and its allocation
    # from gradients then lays out ranks 2 and 1: 192 parameters, 25% under the budget.
    runner.run_bench(tmp_path, make_preset(seeds=(0, 1)), methods=("gora", "lora"), budget=256, progress=False)
    rows = _rows(tmp_path)
    assert [(r["method"], r["seed"], r["size"], r["adapter_params"], r["budget_matched"]) for r in rows] == [
        ("gora", "0", "rank=2", "192", "no"),
        ("gora", "1", "rank=2", "192", "no"),
        ("lora", "0", "rank=2", "256", "yes"),
        ("lora", "1", "rank=2", "256", "yes"),
    ]
    assert "| gora | rank=2 | 192 † |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("proxy", [None, 0.5])
def test_no_earlier_run_s_model_is_alive_when_a_run_s_memory_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_preset: MakePreset, proxy: float | None
) -> None:
    """The peak is reset to the memory in use when a run starts: an earlier model still referenced
    then (the previous seed's, a sweep's best) would count in this run's peak."""
    models: list[weakref.ref[torch.nn.Module]] = []
    alive: list[int] = []
    train, peak_memory = runner.train, runner.peak_memory

    def tracked(*args, **kwargs):
        trained = train(*args, **kwargs)
        models.append(weakref.ref(trained.model))
        return trained

    @contextmanager
    def measured(device: torch.device):
        with peak_memory(device) as result:
            alive.append(sum(ref() is not None for ref in models))  # right after the reset
            yield result

    monkeypatch.setattr(runner, "train", tracked)
    monkeypatch.setattr(runner, "peak_memory", measured)
    preset = make_preset(seeds=(0, 1, 2), lr_factors=(0.01, 1.0, 10.0), lr_proxy=proxy)
    runner.run_bench(tmp_path, preset, methods=("lora", "full"), progress=False)
    assert len(alive) == 2 * (3 + 3 - (proxy is None)) and len(models) == len(alive)
    assert alive == [0] * len(alive)
    (chosen,) = [r for r in _rows(tmp_path) if r["method"] == "lora" and r["seed"] == "0" and r["selected"] == "yes"]
    assert chosen["test_accuracy"]  # the chosen sweep run of the full-length sweep keeps its test metrics
    if proxy is None:  # ... and the sweep's other runs record none, though they were evaluated
        assert not any(r["test_accuracy"] for r in _rows(tmp_path) if r["selected"] == "no")


@pytest.mark.parametrize("proxy", [None, 0.5])
def test_later_calls_with_other_seeds_reuse_the_sweep_and_run_each_seed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_preset: MakePreset, proxy: float | None
) -> None:
    preset = make_preset(seeds=(0,), lr_factors=(0.01, 1.0, 10.0), lr_proxy=proxy)
    runner.run_bench(tmp_path, preset, methods=("full",), progress=False)
    (first,) = [row for row in _rows(tmp_path) if row["selected"] == "yes"]
    calls: list[tuple[int, float]] = []
    train = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: calls.append((a[3], a[4])) or train(*a, **k))

    # Another seed alone: it runs at the factor seed 0's sweep chose; no sweep on seed 3.
    runner.run_bench(tmp_path, preset, methods=("full",), seeds=(3,), progress=False)
    assert calls == [(3, float(first["lr"]))]
    # Then the full list: only the seeds without a selected run.
    calls.clear()
    runner.run_bench(tmp_path, preset, methods=("full",), seeds=(0, 1, 2, 3), progress=False)
    assert calls == [(1, float(first["lr"])), (2, float(first["lr"]))]
    rows = _rows(tmp_path)
    swept = [row["seed"] for row in rows if row["selected"] in ("proxy", "no")]
    assert set(swept) == {"0"} and len(swept) == (3 if proxy else 2)
    selected = [(row["seed"], row["lr_factor"]) for row in rows if row["selected"] == "yes"]
    assert selected == [(seed, first["lr_factor"]) for seed in ("0", "3", "1", "2")]
    assert "| full | - |" in (report := (tmp_path / "results.md").read_text()) and "| 4 |" in report
