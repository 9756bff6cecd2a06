"""Budget allocation: pick one candidate per layer so the model meets a budget of MACs, parameters or the
board's estimated cycles (the whole int8 model's) with the least summed sensitivity.

A multiple-choice knapsack, solved by its Lagrangian relaxation (each layer independently minimises
KL + lambda * cost; lambda bisected to the smallest value that meets the budget), then greedy upgrades
into whatever budget is left. Summing per-layer KLs assumes the layers' errors add, which holds well
for small errors, the regime a budget is chosen in.

With `latency_weight` w > 0 each candidate's loss becomes KL + w * latency / (the dense layers' summed
latency): among factorisations that save MACs, the faster ones on the target's int8 kernels are preferred. With
the board's own estimate (`never_slower`), one that costs more cycles than its dense layer is no option at all.
"""

from collections import defaultdict
from dataclasses import dataclass

from pipeline.compress.budget.sensitivity import Candidate
from pipeline.compress.plan import Choice
from pipeline.errors import ConfigError

RESOURCES = {"macs": "macs", "params": "params", "cycles": "latency"}  # a budget's resource: the Candidate field
ALIASES = {"latency": "cycles"}  # BUDGET=latency:F, the earlier name, is a cycle budget


@dataclass(frozen=True)
class CostBudget:
    resource: str  # "macs", "params" or "cycles" (the board's estimated cycles of the whole int8 model)
    fraction: float  # of the dense model's total to keep

    def __str__(self) -> str:
        return f"{self.resource}:{self.fraction:g}"


def parse_budget(text: str | float) -> CostBudget:
    """'0.35' (of MACs), 'macs:0.35', 'params:0.5' or 'cycles:0.5' ('latency:0.5' is the same): the fraction of
    the dense model to keep, in (0, 1]."""
    resource, _, value = str(text).rpartition(":")
    resource = ALIASES.get(resource, resource or "macs")
    if resource not in RESOURCES:
        raise ConfigError(f"Budget {text!r}: unknown resource {resource!r}; known: {', '.join([*RESOURCES, *ALIASES])}")
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:
        raise ConfigError(f"Budget {text!r}; expected the fraction of the dense model's {resource} to keep, in "
                          "(0, 1], e.g. BUDGET=0.35, BUDGET=params:0.5 or BUDGET=cycles:0.75")
    return CostBudget(resource, fraction)


def _cost(candidate: Candidate, resource: str) -> float:
    return getattr(candidate, RESOURCES[resource])


def _by_layer(candidates: list[Candidate], resource: str, never_slower: bool = False) -> dict[str, list[Candidate]]:
    """Each layer's options, cheapest first: its dense entry and the factorisations that cost less than it in
    the budget's resource, and with `never_slower` also in the target's cycles (a chain slower than its layer is
    never an option, whatever the budget counts)."""
    dense = {c.layer: c for c in candidates if c.method is None}
    by_layer: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        slower = never_slower and c.latency is not None and c.latency >= (dense[c.layer].latency or float("inf"))
        if c.method is None or (_cost(c, resource) < _cost(dense[c.layer], resource) and not slower):
            by_layer[c.layer].append(c)
    for options in by_layer.values():
        options.sort(key=lambda c: (_cost(c, resource), c.kl))
    return by_layer


def check_reachable(candidates: list[Candidate], *, budget: CostBudget, total: float, never_slower: bool = False) -> float:
    """The cheapest the candidates can make the model, as a fraction of `total`; an unreachable budget is an error
    naming that floor. Needs only the candidates' costs, so it runs before any sensitivity is measured."""
    by_layer = _by_layer(candidates, budget.resource, never_slower)
    fixed = total - sum(_cost(next(c for c in o if c.method is None), budget.resource) for o in by_layer.values())
    floor = fixed + sum(_cost(options[0], budget.resource) for options in by_layer.values())
    if floor > budget.fraction * total:
        # cycles of layers timed alone include each run's own input and output, so they can add up to more than
        # the whole model: then only what the options save is meaningful, not what is left outside them
        outside = f"; {fixed:,.0f} in layers not factored" if fixed >= 0 else ""
        raise ConfigError(f"Budget {budget} is out of reach: the cheapest candidate of every layer still keeps "
                          f"{floor / total:.3f} of the {budget.resource} ({floor:,.0f} of {total:,.0f}: the layers' "
                          f"cheapest options save {total - floor:,.0f}{outside}). Raise the budget to at least "
                          f"{floor / total:.3f}, or allow lower ranks or more layers")
    return floor / total


def allocate(candidates: list[Candidate], *, budget: CostBudget, total: float, latency_weight: float = 0.0,
             never_slower: bool = False) -> tuple[dict[str, Choice], dict]:
    """One Choice per layer in `candidates`, and a summary. `total` is the dense model's whole MACs, parameters
    or cycles, layers outside the candidates and the operators between layers included (they stay as they are).
    `never_slower`: the candidates' `latency` is the board's estimate, and none slower than its dense layer is
    an option."""
    if budget.resource == "cycles" and any(c.latency is None for c in candidates):
        untimed = sorted({f"{c.layer} ({c.method or 'dense'})" for c in candidates if c.latency is None})
        raise ConfigError(f"Budget {budget} needs every candidate's cycles; not estimated: {', '.join(untimed[:5])}")
    check_reachable(candidates, budget=budget, total=total, never_slower=never_slower)
    by_layer = _by_layer(candidates, budget.resource, never_slower)
    dense = {name: next(c for c in options if c.method is None) for name, options in by_layer.items()}
    fixed = total - sum(_cost(c, budget.resource) for c in dense.values())
    dense_latency = sum(c.latency or 0.0 for c in dense.values())
    weight = latency_weight / dense_latency if latency_weight and dense_latency else 0.0

    def loss(c: Candidate) -> float:
        own = c.latency if c.latency is not None else (dense[c.layer].latency or 0.0)
        return c.kl + weight * own

    target = budget.fraction * total

    def pick(lam: float) -> dict[str, Candidate]:
        return {name: min(options, key=lambda c: (loss(c) + lam * _cost(c, budget.resource) / total,
                                                   _cost(c, budget.resource)))
                for name, options in by_layer.items()}

    def spent(selection: dict[str, Candidate]) -> int:
        return fixed + sum(_cost(c, budget.resource) for c in selection.values())

    low, high = 0.0, 1.0
    while spent(pick(high)) > target:
        high *= 4
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(pick(mid)) > target else (low, mid)
    selection = pick(high)
    upgrades = 0
    while True:  # spend what the relaxation left on the upgrades that buy the most KL per unit of cost
        slack = target - spent(selection)
        best = None
        for name, options in by_layer.items():
            now = selection[name]
            for c in options:
                extra = _cost(c, budget.resource) - _cost(now, budget.resource)
                if 0 < extra <= slack and loss(c) < loss(now):
                    rate = (loss(now) - loss(c)) / extra
                    if best is None or rate > best[0]:
                        best = (rate, name, c)
        if best is None:
            break
        selection[best[1]] = best[2]
        upgrades += 1
    choices = {name: Choice(c.method, c.ranks, _reason(c, by_layer[name], dense[name], budget, total), kl=c.kl,
                            agreement=c.agreement, latency=c.latency, dense_latency=dense[name].latency)
               for name, c in selection.items()}
    slower = [c for c in candidates if c.method and c.latency is not None and c.latency >= (dense[c.layer].latency or float("inf"))] \
        if never_slower else []
    summary = {"budget": str(budget), "lambda": high, "greedy_upgrades": upgrades, "kept": spent(selection) / total,
               "predicted_kl": round(sum(c.kl for c in selection.values()), 6), "latency_weight": latency_weight,
               "never_slower": never_slower, "slower_than_dense": len(slower)}
    if dense_latency:
        summary["layer_latency"] = {"dense": round(dense_latency, 4), "chosen": round(
            sum(c.latency if c.latency is not None else dense[c.layer].latency or 0.0 for c in selection.values()), 4)}
    return choices, summary


def _reason(chosen: Candidate, options: list[Candidate], dense: Candidate, budget: CostBudget, total: int) -> str:
    saved = (_cost(dense, budget.resource) - _cost(chosen, budget.resource)) / total
    cheaper = [c for c in options if _cost(c, budget.resource) < _cost(chosen, budget.resource)]
    nxt = min(cheaper, key=lambda c: c.kl) if cheaper else None
    then = (f"; the best cheaper option ({nxt.method} {'x'.join(map(str, nxt.ranks))}) costs KL {nxt.kl:.4f}"
            if nxt else "; no cheaper option")
    timing = (f"; cost {chosen.latency:,.4g} vs {dense.latency:,.4g} dense"
              if chosen.method and chosen.latency is not None and dense.latency else "")
    if chosen.method is None:
        return f"budget {budget}: kept dense{then}"
    return (f"budget {budget}: KL {chosen.kl:.4f}, agreement {chosen.agreement:.1%} on held-out images, "
            f"saves {saved:.1%} of the model's {budget.resource}{timing}{then}")
