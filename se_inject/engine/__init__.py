"""The engine, one step a module, data flowing one way:

models (build by name) -> recipes (the recipe language) -> find (patterns, keys: where SE goes; pure) -> plan
(frozen, JSON; schema validates one read from a file) -> verify (each rewrite equals the original with a
pass-through module) -> surgery (apply: slot fill or forward rewrite; fusion behind its own boundary) -> coverage
(every inserted module runs once per call of its block, on every forward path) -> measure (exact counts) and drift.
"""
