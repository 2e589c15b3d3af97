"""Dead letters: reading and filtering them, replay and purge."""
