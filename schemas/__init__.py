"""Versioned JSON Schemas for refinevla rationales, and helpers to load and validate them."""
