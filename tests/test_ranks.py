import numpy as np
import pytest

from pipeline.compress.ranks import RankRule, energy_rank, evbmf_rank, parse_rank, round_up
from pipeline.errors import ConfigError


def planted(rows, cols, rank, scale, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) * 0.3
    return (signal + rng.normal(size=(rows, cols)) * 0.1) * scale


@pytest.mark.parametrize("scale", [1.0, 0.01])
@pytest.mark.parametrize("shape_rank", [(64, 576, 10), (16, 144, 5), (120, 400, 20), (576, 64, 7), (10, 84, 3)])
def test_evbmf_recovers_planted_ranks_at_any_weight_scale(scale, shape_rank):
    rows, cols, rank = shape_rank
    assert evbmf_rank(planted(rows, cols, rank, scale)) == rank


def test_evbmf_never_returns_zero():
    assert evbmf_rank(np.zeros((8, 20))) == 1
    assert evbmf_rank(np.random.default_rng(1).normal(size=(8, 20)) * 1e-3) >= 1


def test_energy_rank_counts_squared_singular_values():
    matrix = np.diag([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(matrix, 9 / 14) == 1
    assert energy_rank(matrix, 0.9) == 2
    assert energy_rank(matrix, 1.0) == 3


def test_parse_rank_accepts_the_documented_forms():
    assert parse_rank("evbmf") == RankRule("evbmf")
    assert parse_rank("energy:0.95") == RankRule("energy", 0.95)
    assert parse_rank("8") == RankRule("fixed", 8)
    assert parse_rank("0.5") == RankRule("ratio", 0.5)


@pytest.mark.parametrize("bad", ["0", "-3", "2.5", "abc", "energy:1.5", "energy:x"])
def test_parse_rank_refuses_nonsense_with_the_expected_forms(bad):
    with pytest.raises(ConfigError, match="expected"):
        parse_rank(bad)


def test_round_up_to_kernel_friendly_multiples_but_not_past_the_maximum():
    assert round_up(5, 8, 64) == 8
    assert round_up(9, 8, 64) == 16
    assert round_up(13, 8, 14) == 14
    assert round_up(3, 1, 64) == 3
