"""Optuna's storage API over REST: what ``caviar.optuna_storage`` talks to."""
