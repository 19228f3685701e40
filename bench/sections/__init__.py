"""One module per bench section: each has ``measure(lab, args)``, which runs stock and safe side by
side and returns its results, and ``table(results, args)``, its part of the report."""
