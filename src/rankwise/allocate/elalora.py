"""ElaLoRA's allocator: prune the globally weakest triplets and grow new ones where the weakest are
still strong, keeping the total rank; shapes really change.

Chang et al., "ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning",
https://arxiv.org/abs/2504.00254; the algorithm is the official code's (HuandongChang/ElaLoRA). The
importance is AdaLoRA's (:class:`~rankwise.allocate.adalora.Sensitivity`). At each event, b(t)
triplets move:

    b(t) = round(b0 · (1 − p³)),   p = clip((t − t_i) / (T − t_f − t_i), 0, 1)
    C_m  = the k_m = min(k, r_m − 1) lowest-scoring triplets of layer m;  P = ∪_m C_m
    prune the b lowest of P;  then grow one triplet in the layer of each of the b highest of P
    new a, b: v, w ~ N(0, I) made orthogonal to the kept rows of A / columns of B (and to the
    other new ones), at unit norm;  new e ≈ 0
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..adapters.adalora import AdaLoRA
from ..adapters.elalora import ElaLoRA
from ..core.checks import check_number
from ..core.distributed import from_rank_zero
from .adalora import TripletAllocator
from .base import MomentFill, migrate

NEW_E = 1e-13  # a new triplet's e: essentially 0, so the model's function does not change (official)


class ElaLoRAAllocator(TripletAllocator):
    """ElaLoRA: move rank between layers during training; the total stays N·r_init.

    Unlike the official code, the optimizer is not rebuilt at an event: the replaced parameters
    take their predecessors' places in the same param groups (the LR schedule keeps running), the
    surviving triplets keep their exact Adam moments, and new triplets start with zero first
    moments and second moments at ``moment_fill`` (:func:`rankwise.allocate.base.migrate`).

    Args:
        model: a model adapted with ``ElaLoRAConfig`` (or ``AdaLoRAConfig``).
        total_steps: T, optimizer steps in the run.
        changes: b0, triplets pruned (and grown) at an event before the schedule decays it; >= 1.
            4: official GLUE scripts.
        candidates: k, the weakest triplets of each layer that enter the pool; >= 1. 2: scripts.
        t_init: t_i, warm-up steps without events; default ``T // 5``.
        t_final: t_f, final steps without events or importance updates; default ``T // 4``.
        delta_t: ΔT, steps between events; default ``max(1, T // 30)``. The three defaults are the
            scripts' proportions (CoLA 500/500/100 of ≈2700 steps, RTE 300/500/50 of ≈1950).
        schedule: decay b cubically (every official script); ``False`` keeps b = b0.
        beta1, beta2: EMA decays; 0.85 (official).
        orth_weight: γ; 0.1 (official).
        squared_orth: the paper's squared norms in the penalty.
        moment_fill: second moments of new triplets: ``"mean"`` of the kept ones, or ``"zero"``.
        reset_optimizer: drop all optimizer state at every event, as the official trainer ends up
            doing (its carry-over never matches); only to reproduce the official runs. The
            official run's other side effect, a constant base LR after the first event, is not
            reproduced: use a constant schedule for that.
        seed: seeds the random directions of new triplets, per (seed, step, layer), so that every
            process draws the same ones.

    Raises:
        ValueError: a value outside its range, or a schedule with no adjustment phase.
    """

    reshapes_during_training = True

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        changes: int = 4,
        candidates: int = 2,
        t_init: int | None = None,
        t_final: int | None = None,
        delta_t: int | None = None,
        schedule: bool = True,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_weight: float = 0.1,
        squared_orth: bool = False,
        moment_fill: MomentFill = "mean",
        reset_optimizer: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(model, total_steps, beta1, beta2, orth_weight, squared_orth)
        self.t_init = total_steps // 5 if t_init is None else t_init
        self.t_final = total_steps // 4 if t_final is None else t_final
        self.delta_t = max(1, total_steps // 30) if delta_t is None else delta_t
        for name, value, low in (
            ("changes", changes, 1),
            ("candidates", candidates, 1),
            ("t_init", self.t_init, 0),
            ("t_final", self.t_final, 0),
            ("delta_t", self.delta_t, 1),
            ("seed", seed, 0),
        ):
            check_number("ElaLoRAAllocator", name, value, low, integer=True)
        if self.t_init >= total_steps - self.t_final:
            raise ValueError(
                f"ElaLoRAAllocator: t_init={self.t_init} must be < total_steps - t_final = "
                f"{total_steps - self.t_final}, "
                "or there is no adjustment phase"
            )
        if moment_fill not in ("mean", "zero"):
            raise ValueError(f"ElaLoRAAllocator: moment_fill={moment_fill!r} must be 'mean' or 'zero'")
        self.changes, self.candidates, self.use_schedule = changes, candidates, schedule
        self.moment_fill, self.reset_optimizer, self.seed = moment_fill, reset_optimizer, seed
        self.init_budget = sum(layer.delta.rank for layer in self.layers.values())

    def changes_at(self, t: int) -> int:
        """b(t), the triplets an event at step t moves."""
        if not self.use_schedule:
            return self.changes
        span = self.total_steps - self.t_final - self.t_init
        progress = min(max((t - self.t_init) / span, 0.0), 1.0)
        return round(self.changes * (1 - progress**3))

    def _step(self, optimizer: torch.optim.Optimizer) -> bool:
        end = self.total_steps - self.t_final
        if self.t < end:
            for path, layer in self.layers.items():
                self.tracker.update(path, layer.delta)
        changes = self.changes_at(self.t)
        if self.t > self.t_init and (self.t - self.t_init) % self.delta_t == 0 and self.t < end and changes > 0:
            return self._event(optimizer, changes)
        return False

    def _event(self, optimizer: torch.optim.Optimizer, changes: int) -> bool:
        scores = self.scores()
        pools, owner_lists, position_lists = [], [], []
        for index, layer_scores in enumerate(scores):
            # Ranks never fall below 1: a rank-1 layer has no candidates (and so cannot grow either).
            weakest = torch.argsort(layer_scores, stable=True)[: min(self.candidates, len(layer_scores) - 1)]
            pools.append(layer_scores[weakest])
            owner_lists.append(torch.full_like(weakest, index))
            position_lists.append(weakest)
        pool, owners, positions = torch.cat(pools), torch.cat(owner_lists), torch.cat(position_lists)
        moved = min(changes, len(pool))
        if moved == 0:
            return False
        order = torch.argsort(pool, stable=True)
        # Prune exactly the `moved` weakest (the official `score <= τ` removes every tie at τ too).
        pruned = torch.zeros(sum(len(s) for s in scores), dtype=torch.long, device=pool.device)
        offsets = torch.tensor([0] + [len(s) for s in scores[:-1]], device=pool.device).cumsum(0)
        pruned[offsets[owners[order[:moved]]] + positions[order[:moved]]] = 1
        grown = torch.bincount(owners[order[-moved:]], minlength=len(scores))
        decision = from_rank_zero(torch.cat([pruned, grown])).cpu()
        pruned, grown = decision[: len(pruned)].bool(), decision[len(pruned) :]
        per_layer = pruned.split([len(s) for s in scores])
        for (path, layer), flags, count in zip(self.layers.items(), per_layer, grown.tolist(), strict=True):
            size = int((~flags).sum()) + count
            if count and size > min(layer.delta.in_features, layer.delta.out_features):
                raise ValueError(
                    f"ElaLoRAAllocator: '{path}' would grow to rank {size}, past min(in, out) = "
                    f"{min(layer.delta.in_features, layer.delta.out_features)}, where no new "
                    "direction is orthogonal to the kept ones; use a smaller rank"
                )
        for index, ((path, layer), flags) in enumerate(zip(self.layers.items(), per_layer, strict=True)):
            count = int(grown[index])
            if not flags.any() and count == 0:
                continue
            keep = (~flags).nonzero().view(-1)
            new = self._new_triplets(layer.delta, keep, count, index) if count else None
            migrate(optimizer, layer.delta.resize(keep.to(layer.delta.A.device), new), keep, count, self.moment_fill)
            self.tracker.resize(path, keep, count)
        if self.reset_optimizer:
            optimizer.state.clear()
        return True

    def _new_triplets(self, module: AdaLoRA, keep: Tensor, count: int, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``count`` new ``(a, e, b)``: unit a orthogonal to the kept rows of A and to each other,
        unit b likewise to the kept columns of B."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.t) * 1_000_003 + index)
        with torch.no_grad():
            device = module.A.device
            A, B = module.A[keep.to(device)], module.B[:, keep.to(device)]
            # Orthonormal bases of the kept spans (QR), grown by each new direction. The official
            # v − Aᵀ A v is exact only for orthonormal rows, which AdaLoRA's penalty only encourages.
            rows, columns = torch.linalg.qr(A.t()).Q, torch.linalg.qr(B).Q
            for _ in range(count):
                v = torch.randn(module.in_features, generator=generator, dtype=A.dtype).to(device)
                rows = torch.cat([rows, _orthogonal_unit(v, rows).unsqueeze(1)], dim=1)
                w = torch.randn(module.out_features, generator=generator, dtype=B.dtype).to(device)
                columns = torch.cat([columns, _orthogonal_unit(w, columns).unsqueeze(1)], dim=1)
            value = min(module.e[keep.to(device)].abs().min().item(), NEW_E)
        return rows[:, -count:].t(), torch.full((count, 1), value, dtype=A.dtype, device=device), columns[:, -count:]

    def ranks(self) -> dict[str, float]:
        return {path: layer.delta.rank for path, layer in self.layers.items()}

    @property
    def budget(self) -> int:
        return self.init_budget


def _orthogonal_unit(v: Tensor, basis: Tensor) -> Tensor:
    """v without its components along the orthonormal columns of ``basis``, at unit norm; projected
    twice, since one Gram–Schmidt pass leaves a residue of order ε · ‖v‖ / ‖result‖ ("twice is enough")."""
    for _ in range(2):
        v = v - basis @ (basis.t() @ v)
    return v / v.norm()


# The method declares the allocator that trains it (see rankwise.allocate.adalora).
ElaLoRA.allocator = ElaLoRAAllocator
