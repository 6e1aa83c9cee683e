"""Batches: one task over a selection of machines, rolled out within limits (see L{roller.batches.model})."""
