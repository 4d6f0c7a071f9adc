"""CharRNN HTTP service: api (validation, adapters, routes) -> engine (scheduler, policy, decode
loop) -> runner (the model on its device, one ``execute(plan)`` call) -> charrnn (the core)."""
