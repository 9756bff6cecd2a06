"""Settings the unit tests share."""

from targets import Decomposition


def plain(**overrides) -> Decomposition:
    """Decomposition settings without the profile's conveniences, so a test sees exactly the ranks it asks for:
    EVBMF ranks unless given, no rounding, and the first and last layers factored like any other."""
    return Decomposition(**{"rank": "evbmf", "round_to": 1, "keep_first_and_last": False, **overrides})
