"""The library's domain errors: one base class, so the stage layer turns any of them into a one-line CLI error.

Library modules raise these (never `click.ClickException`); `stages.common.domain_errors` translates them.
"""

from __future__ import annotations


class StableSDGError(Exception):
    """Something the user can fix (a missing input, a bad parameter, absent weights): its message says what."""


class MissingInputError(StableSDGError, FileNotFoundError):
    """An earlier stage's output is missing or empty (the message names the stage to run)."""


class AdaptationError(StableSDGError, ValueError):
    """The adaptation cannot start (no train images, an unusable initializer word or placeholder)."""


class RegistryError(StableSDGError, RuntimeError):
    """A registry alias move is not possible (unknown champion, already the champion, refused promotion)."""


class FeatureWeightsError(StableSDGError, RuntimeError):
    """The feature network's weights are missing or do not fit the current data/params."""
