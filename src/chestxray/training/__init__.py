"""Training: the loop, distributed helpers and ensembles."""
