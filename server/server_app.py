"""The fleet's ServerApp: parse the run config, run the round loop (server/fleet_loop.py)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.server import Grid
from flwr.serverapp import ServerApp

from server.fleet_loop import run_fleet

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated personalization rounds; the record lands in the run-config `run-dir`."""
    logging.basicConfig(level=logging.INFO)
    summary = run_fleet(grid, context)
    logging.getLogger("fedzoodip.server").info(
        "run finished: %s rounds, stopped=%s, epsilon=%s",
        summary["completed_rounds"],
        summary["stopped"],
        summary.get("epsilon"),
    )
