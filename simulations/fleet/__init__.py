"""The fleet harness: many memory-capped virtual devices running the federated client.

Modules, in the order a run uses them: `profiles` (device kinds), `scenario` (what to simulate),
`memory_model` (predict a configuration's peak; plan each device), `workers` (subprocesses that
hold the model once and run device tasks under a resident-memory watchdog), `faults` (seeded
dropouts, crashes, restarts, memory pressure), `runner` (the rounds), `report` (tables, plots).
"""
