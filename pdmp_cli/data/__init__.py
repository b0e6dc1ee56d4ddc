"""Datasets: specs in a registry, generation of the built-in av-digits, preparation into feature caches."""
from pdmp_cli.data.base import DATASETS, DatasetSpec, FeatureCache, Split, get_dataset, load_dataset, recipe_hash_for
from pdmp_cli.data import avdigits  # noqa: F401  (registers av-digits)

__all__ = ["DATASETS", "DatasetSpec", "FeatureCache", "Split", "get_dataset", "load_dataset", "recipe_hash_for"]
