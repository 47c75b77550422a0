"""Package data, shipped in the wheel as `hparray.sql`: the schema migrations and the named queries."""
