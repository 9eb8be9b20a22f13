"""`ithaca plan`: per-rank memory, traffic and step time of every layout a config allows."""
