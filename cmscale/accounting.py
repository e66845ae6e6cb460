"""FLOP accounting: what one training step costs, how many steps a budget buys, and the FLOPs after n steps.

The sweep planner, the trainer and evaluation all count through :func:`flops_per_step` (one
process-wide :class:`FlopsCache`, backed by a file under the cache root), so they can never
disagree on a run's iteration count. A step is counted with FlopCounterMode on the meta device
(shapes only): forward and backward of the online network plus every extra pass its method makes.
ECT's step cost depends on its stage (the target runs only on the rows with r > 0), so ECT is
counted in two parts and summed stage by stage (:func:`ect_train_flops`); the recipe table
(:mod:`cmscale.methods`) says which methods are priced that way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from cmscale.config import RunConfig, cache_root
from cmscale.data.datasets import dataset_channels
from cmscale.methods import build_method, build_network, ect_loss, recipe_of, wrap_network
from cmscale.rundir import atomic_write_json

FLOPS_CACHE_FILE = "flops_per_step.json"


class BudgetError(ValueError):
    """A compute budget below one training step."""


# ----------------------------------------------------------------------------------------------
# FLOPs per step and iterations


def count_flops_per_step(config: RunConfig) -> int:
    """FLOPs of one training step at ``config.batch_size``, counted with FlopCounterMode.

    Counts forward and backward of the online network plus every extra pass the method makes:
    sCT's JVP, sCD's teacher forward and JVP, and ECT's no-grad target forward, which runs only on
    the rows with r > 0, so an ECT step's cost depends on its stage: for ECT this is the
    run-average (the run's expected FLOPs, summed stage by stage, over its iterations; see
    :func:`ect_train_flops`). Counting runs on the meta device (shapes only) with a randomly
    initialised teacher, since only shapes matter.
    """
    from cmscale.models.flops import count_flops

    if recipe_of(config).stage_dependent_cost:  # the target's rows depend on the draw: count the parts
        return ect_average_step_flops(config, count_ect_step_parts(config))
    img_channels = dataset_channels(config.dataset, config.vae_path)
    counting_config = config.model_copy(update={"budget_iters": 1, "budget_flops": None})
    with torch.device("meta"):
        method = build_method(counting_config, img_channels, device="meta", load_weights=False)
        x0 = torch.zeros(config.batch_size, img_channels, config.resolution, config.resolution)
    method.set_iteration(10**9)  # full tangent warm-up: the step's cost does not depend on it

    def one_step() -> None:
        method.loss(x0).mean().backward()

    return count_flops(one_step)


def _counting_code_fingerprint() -> str:
    """Hash of the code that decides FLOPs per step (methods, models) and the torch version.

    Counts cached on disk under an older fingerprint are never used, so editing a model or a
    loss can never leave a stale count behind.
    """
    from importlib.metadata import version

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256(version("torch").encode())
    for path in sorted([package / "methods.py", package / "accounting.py", *(package / "models").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


class FlopsCache:
    """FLOPs per step per shape, in memory and (for the real counter) in ``<cache root>/flops_per_step.json``.

    Counting one shape traces a training step (seconds on a busy CPU); a sweep has few shapes and
    many runs, so each shape is counted once per code version. The planner and the trainer share
    the process-wide cache (:func:`flops_per_step`), so they can never disagree; a custom
    ``counter`` (tests, benchmarks) keeps its counts in memory only.
    """

    def __init__(self, counter: Callable[[RunConfig], int] | None = None, path: Path | None = None):
        self.counter = counter or count_flops_per_step
        self.path = path if counter is not None else (path or cache_root(create=False) / FLOPS_CACHE_FILE)
        self.fingerprint = _counting_code_fingerprint() if self.path else ""
        self.counts: dict[str, int] = {}
        self._disk_loaded = False

    @staticmethod
    def key(config: RunConfig) -> str:
        """Every setting that changes a step's cost: method, preset, shape, batch, dropout, sCM's weight MLP."""
        weight_mlp = config.scm.weight_mlp_channels if recipe_of(config).learned_weight else 0
        channels = dataset_channels(config.dataset, config.vae_path)
        return (f"{config.method}/{config.preset}/{config.resolution}x{channels}"
                f"/b{config.batch_size}/d{config.dropout}/w{weight_mlp}")

    def _load_disk(self) -> None:
        self._disk_loaded = True
        if not self.path:
            return
        try:
            stored = json.loads(Path(self.path).read_text())
            if stored.get("fingerprint") == self.fingerprint:
                self.counts = {key: int(value) for key, value in stored["counts"].items()} | self.counts
        except (OSError, ValueError, KeyError, AttributeError):
            pass

    def ect_parts(self, config: RunConfig) -> tuple[int, int]:
        """ECT's (online forward + backward, full-batch target forward), cached per shape.

        A custom ``counter`` is taken as the whole step's cost, with no separate target part.
        """
        names = [f"{self.key(config)}/{part}" for part in ("online", "target")]
        if any(name not in self.counts for name in names) and not self._disk_loaded:
            self._load_disk()
        if any(name not in self.counts for name in names):
            real = self.counter is count_flops_per_step
            parts = count_ect_step_parts(config) if real else (int(self.counter(config)), 0)
            self.counts.update(zip(names, parts))
            self._save()
        return self.counts[names[0]], self.counts[names[1]]

    def __call__(self, config: RunConfig) -> int:
        if recipe_of(config).stage_dependent_cost:  # its cost depends on the stage schedule, hence on the budget
            return ect_average_step_flops(config, self.ect_parts(config))
        key = self.key(config)
        if key not in self.counts and not self._disk_loaded:
            self._load_disk()
        if key not in self.counts:
            self.counts[key] = int(self.counter(config))
            self._save()
        return self.counts[key]

    def _save(self) -> None:
        if not self.path:
            return
        try:
            atomic_write_json(Path(self.path), {"fingerprint": self.fingerprint, "counts": self.counts})
        except OSError:
            pass  # a read-only cache only costs time


_SHARED_CACHE: FlopsCache | None = None


def _shared_cache() -> FlopsCache:
    global _SHARED_CACHE
    if _SHARED_CACHE is None:
        _SHARED_CACHE = FlopsCache()
    return _SHARED_CACHE


def flops_per_step(config: RunConfig) -> int:
    """FLOPs of one training step of ``config`` (see :func:`count_flops_per_step`), from the shared cache."""
    return _shared_cache()(config)


def _cache_of(flops: Callable[[RunConfig], int]) -> FlopsCache:
    if isinstance(flops, FlopsCache):
        return flops
    return _shared_cache() if flops is flops_per_step else FlopsCache(flops)


def iterations_for_budget(config: RunConfig, flops: Callable[[RunConfig], int] = flops_per_step) -> int:
    """The run's iteration count: ``budget_iters``, or the FLOP budget over the FLOPs of one step,
    rounded to the nearest whole step (so iterations x FLOPs per step is within half a step of it).
    ECT: the count whose stage-by-stage expected FLOPs are nearest the budget (:func:`ect_iterations`)."""
    if config.budget_iters is not None:
        return config.budget_iters
    if recipe_of(config).stage_dependent_cost:
        parts = _cache_of(flops).ect_parts(config)
        # the cheapest step (stage 0: online pass and the fewest target rows) must fit in the budget
        check_budget_covers_a_step(config.budget_flops, round(ect_train_flops(config, 1, 1, parts)), "budget_flops")
        return ect_iterations(config, parts)
    step_flops = flops(config)
    check_budget_covers_a_step(config.budget_flops, step_flops, "budget_flops")
    return max(1, round(config.budget_flops / step_flops))


def train_flops_at(config: RunConfig, step: int) -> int:
    """Counted training FLOPs after ``step`` steps (ECT: each step's expected cost at its stage, summed)."""
    if recipe_of(config).stage_dependent_cost:
        parts = _shared_cache().ect_parts(config)
        return round(ect_train_flops(config, step, ect_iterations(config, parts), parts))
    return step * flops_per_step(config)


# ----------------------------------------------------------------------------------------------
# ECT: a step's cost depends on its stage


def count_ect_step_parts(config: RunConfig) -> tuple[int, int]:
    """(online forward + backward, no-grad target forward over the whole batch), counted on the meta device.

    An ECT step at stage s costs ``online + P(r > 0 | s) * target`` in expectation: the target runs
    on the rows with r > 0 only, and the FLOPs of these networks are linear in the number of rows.
    """
    from cmscale.models.flops import count_flops

    img_channels = dataset_channels(config.dataset, config.vae_path)
    with torch.device("meta"):
        model = wrap_network(config, build_network(config, img_channels))
        x = torch.zeros(config.batch_size, img_channels, config.resolution, config.resolution)
        sigma = torch.ones(config.batch_size)
    online = count_flops(lambda: model(x, sigma).sum().backward())
    with torch.no_grad():
        target = count_flops(lambda: model(x, sigma))
    return online, target


def ect_step_parts(config: RunConfig) -> tuple[int, int]:
    """:func:`count_ect_step_parts` through the shared cache."""
    return _shared_cache().ect_parts(config)


def ect_train_flops(config: RunConfig, steps: int, iterations: int, parts: tuple[int, int]) -> float:
    """Expected FLOPs of the first ``steps`` ECT steps of a run of ``iterations``, stage by stage (exact sum)."""
    online, target = parts
    loss = ect_loss(config, iterations)
    length = loss.iters_per_stage
    total, stage = 0.0, 0
    while stage * length < steps:
        in_stage = min(steps, (stage + 1) * length) - stage * length
        total += in_stage * (online + loss.target_row_fraction(stage) * target)
        stage += 1
    return total


def ect_iterations(config: RunConfig, parts: tuple[int, int]) -> int:
    """Iterations whose expected ECT FLOPs are nearest ``budget_flops`` (within half a step)."""
    if config.budget_iters is not None:
        return config.budget_iters
    budget = config.budget_flops

    def cost(n: int) -> float:
        return ect_train_flops(config, n, n, parts)

    low, high = 1, max(2, int(budget / parts[0]) + 1)  # every step costs at least the online pass
    while low < high:  # the largest n with cost(n) <= budget (cost grows with n)
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return min(range(max(1, low - 1), low + 3), key=lambda n: abs(cost(n) - budget))


def ect_average_step_flops(config: RunConfig, parts: tuple[int, int]) -> int:
    """ECT's run-average FLOPs per step: the run's expected FLOPs over its iterations."""
    iterations = ect_iterations(config, parts)
    return max(1, round(ect_train_flops(config, iterations, iterations, parts) / iterations))


def check_budget_covers_a_step(budget_flops: float, step_flops: int, field: str) -> None:
    """A budget below one step would be clamped to one step, training on more compute than asked."""
    if budget_flops < step_flops:
        raise BudgetError(f"{field} = {budget_flops:.4g} is below one training step ({step_flops:.4g} FLOPs per step "
                          f"at this preset, resolution and batch size); give at least {step_flops:.4g}")
