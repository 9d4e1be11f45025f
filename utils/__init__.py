"""Shared plumbing: config, registries, paths, checkpoints, tracking, seeding."""
