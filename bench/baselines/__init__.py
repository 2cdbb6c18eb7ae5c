"""Servers we compare against, kept for comparison only; never part of the product."""
