"""What a budget is allocated from, known before any sensitivity work (`check_budget`): every option's skeleton costs
(with the board's cycles where they are weighed), the dense model's totals per resource, the pricing of a whole
selection where channel cuts couple layers or the arena is bounded, and each constraint's floor. An unreachable
budget fails here, naming each floor."""

from dataclasses import dataclass

from pipeline.compress.budget.allocate import check_reachable
from pipeline.compress.budget.arena import timeline
from pipeline.compress.budget.macs import count, totals
from pipeline.compress.budget.menu import fit_rates, fit_removals, middle_cuts, pricing_for
from pipeline.compress.budget.sensitivity import LayerCost, skeleton_candidates
from pipeline.compress.methods import PRUNE
from pipeline.compress.prune import channel_groups, prune, unit_name
from pipeline.errors import ConfigError, StageError
from pipeline.zoo import ModelSpec
from targets import Decomposition
from targets.budget import Budget, Constraint, parse_budget


def _total(spec: ModelSpec, resource: str, layer_cost: LayerCost | None) -> float:
    """The dense model's whole cost in the budget's resource; cycles are the whole int8 model's on the board, the
    operators between the layers (adds, pools, requantization) included."""
    if resource == "cycles":
        return layer_cost.model(spec.module, spec.input_shape)
    macs, params = totals(spec.module, spec.input_shape)
    return macs if resource == "macs" else params


def timed(settings: Decomposition, layer_cost: LayerCost | None) -> LayerCost | None:
    """The cost the allocation weighs, or None: a budget on a board with its own estimate always weighs it (no
    option slower than its dense layer); elsewhere only a latency weight does. A cycle budget needs the board's
    estimate: an error says so, before any work."""
    budget = parse_budget(settings.budget) if settings.budget else None
    if budget is None:
        return None
    if "cycles" in budget.resources and (layer_cost is None or not layer_cost.board):
        about = "no per-layer cost was given" if layer_cost is None else f"its layer cost is {layer_cost.unit}"
        raise ConfigError(f"Budget {budget} counts the board's estimated cycles, but {about}; a cycle budget needs a "
                          "target with a [board] core (cortex-a72, cortex-m4, cortex-m7) and the cycle tools, or use "
                          f"BUDGET=macs:{budget.get('cycles').fraction:g}")
    if layer_cost is not None and (layer_cost.board or settings.latency_weight > 0):
        return layer_cost
    if settings.latency_weight > 0:
        raise ConfigError(f"Budget {budget} with latency weight {settings.latency_weight:g} needs the target's "
                          "layer cost, and none was given")
    return None


@dataclass(frozen=True)
class Menu:
    """What a budget is allocated from, known before any sensitivity work: every option's skeleton costs (with the
    target's cycles where they are weighed), the dense model's totals per resource, the pricing of a selection
    where channel cuts couple layers or the arena is bounded, and each constraint's floor."""

    budget: Budget
    skeleton: list
    totals: dict
    pricing: object | None
    floors: dict


def effective_budget(settings: Decomposition) -> Budget:
    """The budget as given, with `arena:1` added where the profile says RAM must not grow (`arena_never_grows`: the
    microcontrollers') and the budget does not bound the arena itself."""
    budget = parse_budget(settings.budget)
    if settings.arena_never_grows:
        budget = budget.adding(Constraint("arena", fraction=1.0))
    return budget


def check_budget(spec: ModelSpec, settings: Decomposition, layer_cost: LayerCost | None = None) -> Menu:
    """Every option's skeleton costs and the dense model's totals in the budget's resources; a budget below what
    they can reach fails here, before any sensitivity work, naming each constraint's floor. One floor computation
    with the options the allocation will have: on a board's own estimate a factorisation slower than its layer is
    dropped first, so the layers are timed before the check; elsewhere the floor needs no timing and comes first."""
    if layer_cost is None or not layer_cost.board:  # no option is dropped for its cycles: the floor needs no timing
        menu = _menu(spec, settings, None)
        cost = timed(settings, layer_cost)
        return menu if cost is None else _menu(spec, settings, cost)
    return _menu(spec, settings, timed(settings, layer_cost))


def _menu(spec: ModelSpec, settings: Decomposition, cost: LayerCost | None) -> Menu:
    budget = effective_budget(settings)
    skeleton = skeleton_candidates(spec.module, input_shape=spec.input_shape, settings=settings, latency=cost)
    found = {r: _total(spec, r, cost) for r in budget.resources if r not in ("arena", "cycles") or cost is not None}
    cuts = [c for c in skeleton if c.method == PRUNE]
    pricing = None
    if cuts or "arena" in budget.resources:
        try:
            pricing = _pricing(spec, settings, skeleton, found, cost, arena="arena" in budget.resources)
        except ConfigError:
            if parse_budget(settings.budget).get("arena"):
                raise
            budget = parse_budget(settings.budget)  # the implicit arena:1 needs a traceable graph: without one, unbounded
            pricing = _pricing(spec, settings, skeleton, found, cost, arena=False) if cuts else None
        if "arena" in budget.resources:
            found["arena"] = pricing.arena({})
    checked = budget if cost is not None or "cycles" not in budget.resources else \
        Budget(tuple(c for c in budget.constraints if c.resource != "cycles"))
    floors = {}
    if checked.constraints:
        floors = check_reachable(skeleton, budget=checked, totals=found, pricing=pricing,
                                 arena=pricing.arena if pricing and "arena" in budget.resources else None,
                                 never_slower=bool(cost and cost.board))
    return Menu(budget, skeleton, found, pricing, floors)


def _pricing(spec: ModelSpec, settings: Decomposition, skeleton: list, found: dict, cost, *, arena: bool):
    costs_last = list(count(spec.module, spec.input_shape))[-1]
    groups = []
    if any(c.method == PRUNE for c in skeleton):
        groups, _ = channel_groups(spec.module, spec.input_shape, layers=settings.layers, exclude=settings.exclude,
                                   last_layer=costs_last)
    line = None
    out_group = {n: g.name for g in groups for n in g.producers + g.depthwise}
    try:  # the arena's timeline: for an arena constraint, and for each layer's share of the arena in the plan
        line = timeline(spec.module, spec.input_shape, out_group=out_group, channels={g.name: g.channels for g in groups})
    except StageError as exc:
        if arena:
            raise ConfigError(f"Budget {settings.budget or 'arena'} bounds the arena: {exc}. Give a budget without "
                              "arena, or set decomposition.arena_never_grows = false") from exc
    pricing = pricing_for(spec.module, spec.input_shape, groups=groups, candidates=skeleton, totals=found,
                          latency=cost, timeline=line, arena_records=settings.arena_records,
                          cut_then_factor=settings.cut_then_factor)
    if "cycles" in found and cost is not None and cost.board and line is not None:
        _fit_between(spec, pricing, skeleton, cost)
    return pricing


def _fit_between(spec: ModelSpec, pricing, skeleton: list, cost: LayerCost) -> None:
    """The pricing's rates for what the layers' tables miss (see `fit_rates`), from the model with every group at its
    middle cut and, where some groups reach no operator between the layers, with only those cut; then each removable
    group removed alone (`fit_removals`): a whole-model count on the board's estimate each, cached like the dense
    model's."""
    middle = middle_cuts(skeleton)
    if not middle:
        return
    line = pricing.timeline
    inner = {u: c for u, c in middle.items() if line.moved({u.removeprefix(unit_name("")): c.ranks[0]}) == line.moved()}
    measured = []
    for selection in [middle] + ([inner] if inner and len(inner) < len(middle) else []):
        keep = {unit.removeprefix(unit_name("")): c.ranks[0] for unit, c in selection.items()}
        measured.append((selection, cost.model(prune(spec.module, spec.input_shape, keep)[0], spec.input_shape)))
    fit_rates(pricing, measured)
    removals = [c for c in skeleton if c.method == PRUNE and c.ranks == (0,)]
    fit_removals(pricing, [(c, cost.model(prune(spec.module, spec.input_shape, {c.layer.removeprefix(unit_name("")): 0})[0],
                                          spec.input_shape)) for c in removals])
