"""Experiment configs: each module defines get_config(arg) -> ml_collections.ConfigDict."""
