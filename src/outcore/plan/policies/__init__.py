"""Planning policies: each turns (trace, budget, options) into begin/end action lists."""
