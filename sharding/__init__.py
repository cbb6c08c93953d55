"""Meshes and partition rules."""
