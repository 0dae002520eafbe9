"""Models: the registry of architectures, the model families, bundles and the ensemble model.

Importing this package imports no torch; `chestxray.models.bundle` (metadata) stays torch-free.
"""
