"""Workers: the claim -> run -> record loop (`loop`), its wiring in a worker process (`runtime`),
and the local executor that keeps N of them alive on one machine (`executor`). No SQL here: every
question goes to the store."""
