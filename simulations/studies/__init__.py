"""Studies on the fleet harness: each a scenario (TOML) plus a script that runs its variants."""
