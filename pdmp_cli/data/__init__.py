"""Datasets: specs in a registry, generation of the built-in av-digits, adapters of the real datasets,
preparation into feature caches."""
from pdmp_cli.data.base import DATASETS, DatasetSpec, FeatureCache, Split, get_dataset, load_dataset, recipe_hash_for
from pdmp_cli.data import avdigits  # noqa: F401  (registers av-digits)
from pdmp_cli.data import adapters  # noqa: F401  (registers the real datasets and custom manifests)

__all__ = ["DATASETS", "DatasetSpec", "FeatureCache", "Split", "get_dataset", "load_dataset", "recipe_hash_for"]
