"""Declarative search spaces: the schema, `Arch`, and the built-in spaces."""
from search_spaces.arch import Arch, BlockChoice, ExitChoice
from search_spaces.schema import ExitSpec, GaterSpec, StageSpec
from search_spaces.space import SearchSpace, builtin_spaces, load_space, space_from_dict

__all__ = [
    "Arch",
    "BlockChoice",
    "ExitChoice",
    "ExitSpec",
    "GaterSpec",
    "SearchSpace",
    "StageSpec",
    "builtin_spaces",
    "load_space",
    "space_from_dict",
]
