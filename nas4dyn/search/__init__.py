"""Multi-objective search over a trained supernet: Optuna samplers and storages, optionally on Ray Tune."""
from nas4dyn.search.runner import SearchConfig, SearchSummary, run_search

__all__ = ["SearchConfig", "SearchSummary", "run_search"]
