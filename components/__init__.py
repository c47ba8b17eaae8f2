"""Pluggable components (verifiers, reward models, advantage estimators) assembled by the PRPO trainer."""
