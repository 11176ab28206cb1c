"""The PoseBH method: heatmap loss, prototypes and their learning, CPS, CSS, compat switches."""
