"""Integrations with model libraries; each registers tileattn where the library looks for it."""
