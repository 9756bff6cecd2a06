"""Budget allocation: one option per decision unit (a layer: keep it or one of its factorisations; a channel group:
keep its channels or cut them) so that the model meets every constraint of a budget (MACs, parameters, the board's
estimated cycles of the whole int8 model, the activation arena) with the least summed sensitivity.

A multiple-choice knapsack solved by its Lagrangian relaxation: each unit minimises KL + lambda * price, the price
being the option's whole-model costs, each as a share of its constraint's limit, summed over the budget's additive
constraints; lambda is bisected to the smallest value at which every constraint holds, then greedy upgrades spend
whatever is left. Where units are independent (factorisation alone: a layer's cost does not depend on the others)
one pass per lambda is the exact relaxation, optimal on the convex hull. A channel cut changes the shapes, and so
the costs, of every layer it touches: the relaxation is then minimised by coordinate descent (each unit in turn,
given the others, until none changes); a layer whose channels are cut keeps a factorisation only where its ranks fit
the cut shape, priced there (`menu.Pricing.factored`: channel cut, then factorise). Coordinate descent
on coupled units can stop short of the best plan (on ResNet-8 for the Cortex-M4 at cycles:0.75 the whole menu's plan
predicted KL 0.259, factorisations alone 0.216), so where the units offer both families each family's own menu is
solved as well and the least predicted loss that meets the budget is kept (`solved_with`): never worse, by the
measured sensitivities, than either family alone. The arena is a peak, not a sum: it is a feasibility rule of every
move instead (a move is taken only when the planned arena of the selection it makes still fits), starting from the
dense model, or from the smallest arena there is when the limit lies below the dense model's.

Summing per-unit KLs assumes their errors add, which holds well for small errors, the regime a budget is chosen in.
With `latency_weight` w > 0 each option's loss becomes KL + w * latency / (the dense layers' summed latency). With
the board's own estimate (`never_slower`), a factorisation that costs more cycles than its dense layer is no option
at all, in the floor as in the allocation.
"""

from collections import defaultdict
from collections.abc import Callable

from pipeline.compress.budget.sensitivity import Candidate
from pipeline.compress.plan import Choice
from pipeline.errors import BudgetOutOfReach, ConfigError
from targets.budget import Budget, parse_budget

__all__ = ["allocate", "floors", "check_reachable", "parse_budget", "Budget", "FIELD"]

FIELD = {"macs": "macs", "params": "params", "cycles": "latency"}  # an additive resource: the Candidate field
ADDITIVE = tuple(FIELD)
EPSILON = 1e-9


def _cost(candidate: Candidate, resource: str) -> float:
    return getattr(candidate, FIELD[resource])


def units_of(candidates: list[Candidate], budget: Budget, never_slower: bool = False) -> dict[str, list[Candidate]]:
    """Each unit's options, its keep option first: a layer's factorisations that cost less than it in every
    additive resource the budget counts (a chain with more parameters saves no parameters) and, with
    `never_slower`, in the board's cycles; a channel group's cuts."""
    keep = {c.layer: c for c in candidates if c.method is None}
    units: dict[str, list[Candidate]] = defaultdict(list)
    counted = [r for r in budget.resources if r in ADDITIVE]
    for c in candidates:
        if c.method is None or c.method == "prune":
            units[c.layer].append(c)
            continue
        dense = keep[c.layer]
        slower = never_slower and c.latency is not None and c.latency >= (dense.latency or float("inf"))
        if not slower and all(_cost(c, r) < _cost(dense, r) for r in counted):
            units[c.layer].append(c)
    for name, options in units.items():
        if options[0].method is not None:  # a group's keep option, when the table did not list one
            options.insert(0, Candidate(name, None, (), 0, 0, 0.0, 1.0))
        options[1:] = sorted(options[1:], key=lambda c: (c.kl, c.ranks))
    return dict(units)


class Separable:
    """Whole-model costs when every unit's cost is its own: the dense totals less what each chosen option saves."""

    def __init__(self, units: dict[str, list[Candidate]], totals: dict[str, float]):
        self.totals = totals
        self.dense = {name: options[0] for name, options in units.items()}

    def __call__(self, selection: dict[str, Candidate]) -> dict[str, float]:
        return {r: self.totals[r] + sum(_cost(c, r) - _cost(self.dense[n], r) for n, c in selection.items())
                for r in self.totals if r in ADDITIVE}

    def change(self, selection: dict[str, Candidate], moves: dict[str, Candidate]) -> dict[str, float]:
        """What the whole-model costs change by when the units in `moves` take those options instead."""
        return {r: sum(_cost(o, r) - _cost(selection[n], r) for n, o in moves.items())
                for r in self.totals if r in ADDITIVE}

    def conflicts(self, selection: dict[str, Candidate], name: str, option: Candidate) -> list[str]:
        return []


def _move(units, price, selection, name: str, option: Candidate) -> dict[str, Candidate]:
    """Unit `name` taking `option`, with every unit it cannot coexist with back at its keep option (a channel cut
    and a factorisation of a layer it touches); empty when one of those is held to another option."""
    resets = {u: units[u][0] for u in price.conflicts(selection, name, option)}
    if any(o.method is not None for o in resets.values()):
        return {}
    return {name: option, **resets}


def _limits(budget: Budget, totals: dict[str, float]) -> dict[str, float]:
    missing = [c.resource for c in budget.constraints if c.resource not in totals]
    if missing:
        raise ConfigError(f"Budget {budget}: no dense figure for {', '.join(missing)} was given; known: "
                          f"{', '.join(totals)}")
    return {c.resource: c.limit(totals[c.resource]) for c in budget.constraints}


def _descend(units, start, score: Callable[[float, dict], tuple], price, loss=lambda c: 0.0,
             feasible: Callable[[dict], bool] = lambda s: True) -> dict[str, Candidate]:
    """Coordinate descent: each unit in turn takes the option minimising `score(summed loss, whole-model costs)`,
    given the others and among the moves that keep the selection `feasible`, until no unit changes (one pass when
    the units are independent)."""
    selection = dict(start)
    costs = price(selection)
    total_loss = sum(loss(c) for c in selection.values())
    for _ in range(12):
        changed = False
        for name, options in units.items():
            current = selection[name]
            best, best_key, best_delta = current, None, None
            for option in options:
                moves = {} if option is current else _move(units, price, selection, name, option)
                if option is not current and not moves:
                    continue
                delta = price.change(selection, moves) if moves else {}
                trial = {r: v + delta.get(r, 0.0) for r, v in costs.items()}
                gain = sum(loss(o) - loss(selection[u]) for u, o in moves.items())
                k = score(total_loss + gain, trial)
                if (best_key is None or k < best_key) and (not moves or feasible({**selection, **moves})):
                    best, best_key, best_delta, best_moves, best_gain = option, k, delta, moves, gain
            if best is not current:
                selection.update(best_moves)
                changed = True
                costs = {r: v + best_delta.get(r, 0.0) for r, v in costs.items()}
                total_loss += best_gain
        if not changed:
            break
    return selection


def _arena_descent(units, start, arena, price) -> dict[str, Candidate]:
    """The selection with the least planned arena, by coordinate descent on the whole plan."""
    selection = dict(start)
    for _ in range(12):
        changed = False
        for name, options in units.items():
            best, best_bytes = None, arena(selection)
            for option in options:
                if option is selection[name]:
                    continue
                moves = _move(units, price, selection, name, option)
                if not moves:
                    continue
                size = arena({**selection, **moves})
                if size < best_bytes:
                    best, best_bytes = moves, size
            if best is not None:
                selection.update(best)
                changed = True
        if not changed:
            break
    return selection


def floors(candidates: list[Candidate], *, budget: Budget, totals: dict[str, float], pricing=None,
           arena: Callable | None = None, never_slower: bool = False) -> dict[str, float]:
    """The least each of the budget's resources can reach, as a fraction of the dense model's: the one floor the
    early check and the allocation both use, with the options the allocation may take (never_slower included)."""
    units = units_of(candidates, budget, never_slower)
    price = pricing or Separable(units, totals)
    start = {n: o[0] for n, o in units.items()}
    found = {}
    for resource in budget.resources:
        if resource == "arena":
            if arena is not None:
                found[resource] = arena(_arena_descent(units, start, arena, price)) / totals["arena"]
            continue
        low = _descend(units, start, lambda _loss, costs, r=resource: (costs[r],), price)
        found[resource] = price(low)[resource] / totals[resource]
    return found


def jointly_reachable(candidates: list[Candidate], *, budget: Budget, totals: dict[str, float], pricing=None,
                      arena: Callable | None = None, never_slower: bool = False) -> bool:
    """Whether one selection meets the additive constraints while the arena stays within its limit: the cheapest
    selection the descent finds under the arena rule (each constraint alone may be reachable, and not together)."""
    units = units_of(candidates, budget, never_slower)
    price = pricing or Separable(units, totals)
    limits = _limits(budget, totals)
    additive = [r for r in budget.resources if r in ADDITIVE]
    start = {n: o[0] for n, o in units.items()}
    feasible = (lambda s: arena(s) <= limits["arena"] * (1 + EPSILON)) if arena and "arena" in limits else (lambda s: True)
    if not feasible(start):
        start = _arena_descent(units, start, arena, price)
        if not feasible(start):
            return False
    low = _descend(units, start, lambda _loss, costs: (sum(costs[r] / limits[r] for r in additive),), price,
                   feasible=feasible)
    costs = price(low)
    return all(costs[r] <= limits[r] * (1 + EPSILON) for r in additive)


def check_reachable(candidates: list[Candidate], *, budget: Budget, totals: dict[str, float], pricing=None,
                    arena: Callable | None = None, never_slower: bool = False) -> dict[str, float]:
    """Each constraint's floor (see `floors`); a budget any of whose constraints lies below its floor is an error
    naming every constraint's floor. Needs only the options' costs, so it runs before any sensitivity is
    measured."""
    found = floors(candidates, budget=budget, totals=totals, pricing=pricing, arena=arena, never_slower=never_slower)
    limits = _limits(budget, totals)
    missed = [c for c in budget.constraints if c.resource in found
              and found[c.resource] * totals[c.resource] > limits[c.resource] * (1 + EPSILON)]
    if missed:
        parts = []
        for c in budget.constraints:
            if c.resource not in found:
                continue
            floor, dense = found[c.resource] * totals[c.resource], totals[c.resource]
            verdict = "" if len(found) == 1 else f"{c} {'out of reach' if c in missed else 'reachable'}: "
            parts.append(f"{verdict}the cheapest options keep {found[c.resource]:.3f} of the {c.resource} "
                         f"({floor:,.0f} of {dense:,.0f}: the cheapest options save {dense - floor:,.0f})")
        first = missed[0]
        at_least = (f"{found[first.resource]:.3f}" if first.limit_bytes is None
                    else f"{found[first.resource] * totals[first.resource]:,.0f} bytes")
        raise BudgetOutOfReach(f"Budget {budget} is out of reach: {'; '.join(parts)}. Raise {first.resource} to at "
                               f"least {at_least}, or allow lower ranks, channel cuts or more layers", floors=found)
    return found


def allocate(candidates: list[Candidate], *, budget: Budget, total: float | None = None,
             totals: dict[str, float] | None = None, latency_weight: float = 0.0, never_slower: bool = False,
             pricing=None, arena: Callable | None = None) -> tuple[dict[str, Choice], dict]:
    """One Choice per unit in `candidates`, and a summary. `totals` are the dense model's whole figures per
    resource (`total` alone: the first constraint's), layers outside the candidates and the operators between
    layers included. `pricing` prices a whole selection where channel cuts couple the units (see
    `pipeline.compress.budget.menu`); `arena` plans a selection's activation bytes."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    totals = dict(totals or {budget.resource: total})
    if "cycles" in budget.resources and any(c.latency is None for c in candidates if c.method != "prune"):
        untimed = sorted({f"{c.layer} ({c.method or 'dense'})" for c in candidates
                          if c.latency is None and c.method != "prune"})
        raise ConfigError(f"Budget {budget} needs every candidate's cycles; not estimated: {', '.join(untimed[:5])}")
    if "arena" in budget.resources and arena is None:
        raise ConfigError(f"Budget {budget} bounds the arena, and no arena estimate was given (a target without "
                          "activation memory figures)")
    check_reachable(candidates, budget=budget, totals=totals, pricing=pricing, arena=arena, never_slower=never_slower)
    units = units_of(candidates, budget, never_slower)
    price = pricing or Separable(units, totals)
    limits = _limits(budget, totals)
    additive = [r for r in budget.resources if r in ADDITIVE]
    dense = {name: options[0] for name, options in units.items()}
    dense_latency = sum(c.latency or 0.0 for c in dense.values())
    weight = latency_weight / dense_latency if latency_weight and dense_latency else 0.0

    def loss(c: Candidate) -> float:
        own = c.latency if c.latency is not None else (dense[c.layer].latency or 0.0)
        return c.kl + weight * own

    def spent(selection) -> dict[str, float]:
        costs = price(selection)
        if arena is not None and "arena" in budget.resources:
            costs["arena"] = arena(selection)
        return costs

    def fits(costs: dict[str, float], resources) -> bool:
        return all(costs[r] <= limits[r] * (1 + EPSILON) for r in resources)

    def normalised(costs: dict[str, float]) -> float:
        return sum(costs[r] / limits[r] for r in additive)

    bounded = arena is not None and "arena" in budget.resources
    planned: dict[tuple, float] = {}

    def within_arena(selection) -> bool:
        """The arena is a peak, not a sum: a move is taken only when the selection it makes still fits (plans are
        cached, many selections recur between lambda steps)."""
        if not bounded:
            return True
        key = tuple(sorted((u, o.method, o.ranks) for u, o in selection.items() if o.method is not None))
        if key not in planned:
            planned[key] = arena(selection)
        return planned[key] <= limits["arena"] * (1 + EPSILON)

    def solve(units: dict[str, list[Candidate]]) -> dict[str, Candidate]:
        start = {n: o[0] for n, o in units.items()}
        if not within_arena(start):  # a limit below the dense arena: start from the smallest arena there is
            start = _arena_descent(units, start, arena, price)
        if not additive:
            return dict(start)

        def pick(lam):
            return _descend(units, start, lambda kl, costs: (kl + lam * normalised(costs), normalised(costs)), price,
                            loss, feasible=within_arena)

        low, high = 0.0, 1.0
        while not fits(price(pick(high)), additive):
            high *= 4
            if high > 1e12:
                raise ConfigError(f"Budget {budget}: no selection meets {', '.join(budget.resources)} together (each "
                                  "alone is reachable); raise one of them")
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if not fits(price(pick(mid)), additive) else (low, mid)
        return _upgrade(units, pick(high))

    def _upgrade(units: dict[str, list[Candidate]], selection) -> dict[str, Candidate]:
        """Spend what the relaxation left on the upgrades that buy the most KL per unit of price."""
        nonlocal upgrades
        while True:
            now_costs = price(selection)
            now_price = normalised(now_costs)
            best = None
            for name, options in units.items():
                for c in options:
                    moves = _move(units, price, selection, name, c)
                    gain = sum(loss(selection[u]) - loss(o) for u, o in moves.items())
                    if not moves or gain <= 0:
                        continue
                    delta = price.change(selection, moves)
                    trial = {r: v + delta.get(r, 0.0) for r, v in now_costs.items()}
                    if not fits(trial, additive):
                        continue
                    rate = gain / max(normalised(trial) - now_price, EPSILON)
                    if (best is None or rate > best[0]) and within_arena({**selection, **moves}):
                        best = (rate, moves)
            if best is None:
                return selection
            selection.update(best[1])
            upgrades += 1

    upgrades = 0
    selection, family = solve(units), "both"
    # the descent on coupled units is not exact (see the module's docstring): each family's menu is solved too
    for name, restricted in _family_menus(units).items():
        try:
            other = solve(restricted)
        except ConfigError:  # that family alone cannot meet the budget
            continue
        if fits(spent(other), budget.resources) and (not fits(spent(selection), budget.resources) or sum(
                map(loss, other.values())) < sum(map(loss, selection.values())) - EPSILON):
            selection, family = other, name
    costs = spent(selection)
    if not fits(costs, budget.resources):
        over = [f"{r} {costs[r]:,.0f} > {limits[r]:,.0f}" for r in budget.resources if costs[r] > limits[r] * (1 + EPSILON)]
        raise ConfigError(f"Budget {budget}: no selection found that meets every constraint together ({'; '.join(over)} "
                          "at the closest); raise one of them")
    choices = {name: Choice(c.method, c.ranks, _reason(c, units, dense[name], budget, price, selection),
                            kl=c.kl, agreement=c.agreement, latency=c.latency, dense_latency=dense[name].latency)
               for name, c in selection.items()}
    slower = [c for c in candidates if c.method not in (None, "prune") and c.latency is not None
              and c.latency >= (dense[c.layer].latency or float("inf"))] if never_slower else []
    summary = {"budget": str(budget), "greedy_upgrades": upgrades, "solved_with": family,
               "kept": costs[budget.resource] / totals[budget.resource],
               "kept_by_resource": {r: round(costs[r] / totals[r], 6) for r in budget.resources},
               "estimated": {r: round(costs[r], 2) for r in budget.resources},
               "predicted_kl": round(sum(c.kl for c in selection.values()), 6), "latency_weight": latency_weight,
               "never_slower": never_slower, "slower_than_dense": len(slower), "arena_plans": len(planned)}
    if dense_latency:
        summary["layer_latency"] = {"dense": round(dense_latency, 4), "chosen": round(
            sum(c.latency if c.latency is not None else dense[c.layer].latency or 0.0 for c in selection.values()), 4)}
    return choices, summary


def _family_menus(units: dict[str, list[Candidate]]) -> dict[str, dict[str, list[Candidate]]]:
    """Each family's own menu where the units offer both: factorisations only (every cut group kept whole), and
    channel cuts only (every layer kept unfactored)."""
    cut = {n for n, options in units.items() if any(c.method == "prune" for c in options)}
    factored = {n for n, options in units.items() if any(c.method not in (None, "prune") for c in options)}
    if not cut or not factored:
        return {}
    return {"factorisations": {n: o if n not in cut else o[:1] for n, o in units.items()},
            "cuts": {n: o if n not in factored else o[:1] for n, o in units.items()}}


def _reason(chosen: Candidate, units: dict[str, list[Candidate]], dense: Candidate, budget: Budget, price,
            selection) -> str:
    resource = budget.resource
    whole = price(selection).get(resource)
    alone = price({**selection, **_move(units, price, selection, chosen.layer, dense)}).get(resource) \
        if whole is not None else None
    moves = {id(c): _move(units, price, selection, chosen.layer, c) for c in units[chosen.layer] if c is not chosen}
    cheaper = [c for c in units[chosen.layer] if moves.get(id(c)) and resource in FIELD
               and price.change(selection, moves[id(c)])[resource] < 0]
    nxt = min(cheaper, key=lambda c: c.kl) if cheaper else None
    then = f"; the best cheaper option ({_option(nxt)}) costs KL {nxt.kl:.4f}" if nxt else "; no cheaper option"
    timing = (f"; cost {_amount(chosen.latency)} vs {_amount(dense.latency)} dense"
              if chosen.method not in (None, "prune") and chosen.latency is not None and dense.latency else "")
    layers = getattr(price, "layers", {})
    if timing and chosen.layer in layers and price.shape(selection, chosen.layer) != layers[chosen.layer].full:
        # cut, then factored: the chain at the cut shape against the cut layer, not the dense-shape figures
        chain, layer = price.cost(selection, chosen.layer)["cycles"], price.variant(selection, chosen.layer)["cycles"]
        timing = f"; cost {_amount(chain)} vs {_amount(layer)} for the cut layer"
    if chosen.method is None:
        return f"budget {budget}: kept dense{then}"
    saved = f", saves {(alone - whole) / price.totals[resource]:.1%} of the model's {resource}" \
        if whole is not None and alone is not None and resource in price.totals else ""
    what = ("removed whole, " if chosen.ranks == (0,) else f"keeps {chosen.ranks[0]} channels, ") \
        if chosen.method == "prune" else ""
    return (f"budget {budget}: {what}KL {chosen.kl:.4f}, agreement {chosen.agreement:.1%} on held-out images"
            f"{saved}{timing}{then}")


def _option(c: Candidate) -> str:
    return "removal" if c.method == "prune" and c.ranks == (0,) else f"{c.method} {'x'.join(map(str, c.ranks))}"


def _amount(value: float) -> str:
    """A cost as a reader takes it: cycles as whole numbers with separators, milliseconds to four figures."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
