"""Methods used by more than one stage."""
