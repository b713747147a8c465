"""Sweeps of gin-configured runs: definitions (sweep), executors (local, xm_executor),
the unit runner (unit), the report (report) and the launcher every launch/ file calls."""
