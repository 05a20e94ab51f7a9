"""A run from config to summary: pre-flight checks, assembly, training, the dry run."""
