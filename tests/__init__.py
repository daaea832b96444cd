"""Test package (a regular package, so a top-level ``tests`` module installed by another distribution cannot shadow it)."""
